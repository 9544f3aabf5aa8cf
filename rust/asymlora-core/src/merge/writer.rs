//! Writing a merged checkpoint: one output file per input file, same names, same
//! tensor order; the header is copied as it is when no dtype changes (so the output
//! differs from the input only in the merged tensors' bytes), and rebuilt otherwise.
//!
//! Each file is streamed: unchanged tensors (and runs of them) are copied by the kernel
//! (`copy_file_range`), merged and converted tensors are computed in bands of rows into
//! a few recycled buffers and handed to a writer thread, so computing the next band
//! overlaps writing the previous one and memory stays bounded whatever the sizes.

use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use safetensors::Dtype as StDtype;

use super::checkpoint::{Checkpoint, Shard};
use super::engine::{self, Factors, Float};
use super::{out_dtype, Job, Loaded, MergeOptions, MergeReport, Observer, Plan, Totals};
use crate::error::{Error, Result};
use crate::io::{copy_range, data_len, header_bytes, sync_parent, Appender, AtomicFile, TensorInfo};

/// Output bytes per band of a computed tensor.
const BAND_BYTES: usize = 8 << 20;
/// Band buffers alive at once: one computing, one queued, one being written.
const MAX_BUFFERS: usize = 3;

enum HeaderSource {
    /// The input header, byte for byte (no dtype changes in this file).
    Copy(Range<usize>),
    New(Vec<u8>),
}

enum Item {
    /// Input bytes copied as they are (one or more consecutive unchanged tensors).
    Copy(Range<usize>),
    Compute {
        name: String,
        range: Range<usize>,
        info: TensorInfo,
        out: StDtype,
        job: Option<Job>,
    },
}

struct ShardPlan {
    header: HeaderSource,
    items: Vec<Item>,
    in_data: u64,
    out_data: u64,
    out_bytes: u64,
}

fn plan_shard(shard: &Shard, plan: &Plan, opts: &MergeOptions) -> Result<ShardPlan> {
    let tensors = shard.file.tensors_in_file_order();
    let outs: Vec<StDtype> = tensors.iter().map(|(_, i, _)| out_dtype(i.dtype, opts.dtype)).collect();
    let same_layout = tensors.iter().zip(&outs).all(|((_, i, _), o)| i.dtype == *o);
    let new_infos: Vec<TensorInfo> = tensors
        .iter()
        .zip(&outs)
        .map(|((_, i, _), o)| TensorInfo {
            dtype: *o,
            shape: i.shape.clone(),
        })
        .collect();
    let header = if same_layout {
        HeaderSource::Copy(shard.file.header_range())
    } else {
        let bytes = header_bytes(
            tensors.iter().zip(&new_infos).map(|((n, _, _), i)| (*n, i)),
            shard.file.metadata(),
        )
        .map_err(|e| Error::checkpoint(shard.file.path(), e))?;
        HeaderSource::New(bytes)
    };
    let header_len = match &header {
        HeaderSource::Copy(r) => r.len(),
        HeaderSource::New(b) => b.len(),
    } as u64;
    let mut items: Vec<Item> = vec![];
    let (mut in_data, mut out_data) = (0u64, 0u64);
    for (((name, info, range), out), new_info) in tensors.iter().zip(&outs).zip(&new_infos) {
        in_data += range.len() as u64;
        out_data += data_len(new_info) as u64;
        let job = plan.jobs.get(*name).cloned();
        if job.is_none() && info.dtype == *out {
            if let Some(Item::Copy(prev)) = items.last_mut() {
                if prev.end == range.start {
                    prev.end = range.end;
                    continue;
                }
            }
            if !range.is_empty() {
                items.push(Item::Copy(range.clone()));
            }
        } else {
            items.push(Item::Compute {
                name: name.to_string(),
                range: range.clone(),
                info: (*info).clone(),
                out: *out,
                job,
            });
        }
    }
    Ok(ShardPlan {
        header,
        items,
        in_data,
        out_data,
        out_bytes: header_len + out_data,
    })
}

// ------------------------------------------------------------------------- streaming

enum Op<'a> {
    Bytes(Vec<u8>),
    Copy {
        src: &'a File,
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

struct Done {
    bytes: u64,
    buf: Option<Vec<u8>>,
}

/// The computing side of one output file: hands work to the writer thread, recycles
/// band buffers, reports progress and polls for cancellation.
struct Stream<'a, 'o> {
    tx: Option<mpsc::SyncSender<Op<'a>>>,
    done: mpsc::Receiver<Done>,
    free: Vec<Vec<u8>>,
    allocated: usize,
    observer: &'o mut dyn Observer,
}

/// Marks a send to a writer thread that has stopped (its own error is reported instead).
fn writer_stopped() -> Error {
    Error::io("<output>", std::io::Error::other("the writer stopped"))
}

impl<'a> Stream<'a, '_> {
    fn on_done(&mut self, d: Done) {
        self.observer.advance(d.bytes, 0);
        if let Some(b) = d.buf {
            self.free.push(b);
        }
    }

    fn poll(&mut self) -> Result<()> {
        while let Ok(d) = self.done.try_recv() {
            self.on_done(d);
        }
        if self.observer.cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn send(&mut self, op: Op<'a>) -> Result<()> {
        self.poll()?;
        self.tx
            .as_ref()
            .expect("open until finished")
            .send(op)
            .map_err(|_| writer_stopped())
    }

    fn copy(&mut self, src: &'a File, path: &'a Path, range: Range<usize>) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        self.send(Op::Copy {
            src,
            path,
            offset: range.start as u64,
            len: range.len() as u64,
        })
    }

    /// A buffer of `len` bytes (contents unspecified), waiting for one to come back
    /// from the writer when all are in use.
    fn buffer(&mut self, len: usize) -> Result<Vec<u8>> {
        loop {
            self.poll()?;
            if let Some(mut b) = self.free.pop() {
                b.resize(len, 0);
                return Ok(b);
            }
            if self.allocated < MAX_BUFFERS {
                self.allocated += 1;
                return Ok(vec![0u8; len]);
            }
            match self.done.recv() {
                Ok(d) => self.on_done(d),
                Err(_) => return Err(writer_stopped()),
            }
        }
    }
}

/// Runs `drive` against a writer thread that appends to `dst`.
fn stream_to<'a>(
    dst: &mut File,
    dst_path: &Path,
    observer: &mut dyn Observer,
    drive: impl FnOnce(&mut Stream<'a, '_>) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Op<'a>>(1);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let writer = s.spawn(move || -> Result<()> {
            let mut appender = Appender::new();
            for op in rx {
                let done = match op {
                    Op::Bytes(b) => {
                        appender.append(dst, &b).map_err(|e| Error::io(dst_path, e))?;
                        Done {
                            bytes: b.len() as u64,
                            buf: Some(b),
                        }
                    }
                    Op::Copy { src, path, offset, len } => {
                        copy_range(src, path, offset, len, dst, dst_path)?;
                        Done { bytes: len, buf: None }
                    }
                };
                let _ = done_tx.send(done);
            }
            Ok(())
        });
        let mut stream = Stream {
            tx: Some(tx),
            done: done_rx,
            free: vec![],
            allocated: 0,
            observer,
        };
        let driven = drive(&mut stream);
        stream.tx = None; // the writer finishes what is queued, then stops
        if driven.is_ok() {
            while let Ok(d) = stream.done.recv() {
                stream.on_done(d);
            }
        }
        drop(stream);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::io(dst_path, std::io::Error::other("the writer thread panicked"))));
        match (driven, written) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    })
}

// ------------------------------------------------------------------------- computing

struct Ctx<'a> {
    loaded: &'a [Loaded],
    opts: &'a MergeOptions,
    pool: &'a rayon::ThreadPool,
}

#[derive(Default)]
struct Counts {
    merged: usize,
    replaced: usize,
    converted: usize,
    unchanged: usize,
    nonfinite: u64,
    merged_values: u64,
    recomputed: u64,
    warnings: Vec<String>,
}

impl<'a> Ctx<'a> {
    fn check_overflow(&self, bad: u64, name: &str, out: StDtype, what: &str, counts: &mut Counts) -> Result<()> {
        if bad == 0 {
            return Ok(());
        }
        if !self.opts.allow_nonfinite {
            return Err(Error::NonFinite {
                message: format!(
                    "{what} {name} gives {bad} infinite or NaN value(s) in {} (it overflows the dtype); nothing was \
                     written (pass --allow-nonfinite, or allow_nonfinite=True, to keep them)",
                    out
                ),
            });
        }
        counts.nonfinite += bad;
        counts.warnings.push(format!(
            "{what} {name}: {bad} value(s) became infinite or NaN in {}",
            out
        ));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_tensor(
        &self,
        stream: &mut Stream<'a, '_>,
        shard: &'a Shard,
        name: &str,
        range: &Range<usize>,
        info: &TensorInfo,
        out: StDtype,
        terms: &[super::TermRef],
        counts: &mut Counts,
    ) -> Result<()> {
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let wk = Float::from_st(info.dtype).expect("merge targets checked to be float");
        let ok = Float::from_st(out).expect("float in, float out");
        let mut owned = Vec::with_capacity(terms.len());
        for t in terms {
            let ad = &self.loaded[t.adapter];
            let a = self.pool.install(|| ad.a_values(&t.module))?;
            let b = ad.values(&t.module.b_key)?;
            owned.push((a, b));
        }
        let eterms: Vec<engine::Term<'_>> = terms
            .iter()
            .zip(&owned)
            .map(|(t, (a, b))| engine::Term {
                coef: t.coef,
                a,
                b,
                rank: t.module.rank,
                d_in: t.module.d_in,
                d_out: t.module.d_out,
                transposed: t.module.transposed,
            })
            .collect();
        let factors = Factors::build(&eterms, rows, cols, engine::precision(wk, ok));
        drop(eterms);
        drop(owned);
        let mut stats = engine::RowStats::default();
        if rows > 0 && cols > 0 {
            let (ws, os) = (wk.size(), ok.size());
            let band_rows = (BAND_BYTES / (cols * ws.max(os))).max(1);
            let mut r0 = 0;
            while r0 < rows {
                let n = band_rows.min(rows - r0);
                let input = range.start + r0 * cols * ws..range.start + (r0 + n) * cols * ws;
                let mut buf = stream.buffer(n * cols * os)?;
                shard.file.prefetch(input.clone());
                let w = shard.file.bytes(input.clone());
                stats += self
                    .pool
                    .install(|| engine::merge_rows(w, wk, &mut buf, ok, &factors, r0));
                shard.file.release(input);
                stream.send(Op::Bytes(buf))?;
                r0 += n;
            }
        }
        self.check_overflow(stats.nonfinite, name, out, "merging into", counts)?;
        stream.observer.advance(0, 1);
        counts.merged += 1;
        counts.merged_values += (rows * cols) as u64;
        counts.recomputed += stats.recomputed;
        Ok(())
    }

    /// Converts `src` (float dtype `sk`, bytes `range` of `file`) to `out`, in bands.
    fn convert_tensor(
        &self,
        stream: &mut Stream<'a, '_>,
        file: &'a crate::io::SafetensorsFile,
        range: Range<usize>,
        sk: Float,
        out: StDtype,
    ) -> Result<u64> {
        let ok = Float::from_st(out).expect("float in, float out");
        let n = range.len() / sk.size();
        let per_band = (BAND_BYTES / sk.size().max(ok.size())).max(1);
        let mut bad = 0;
        let mut e0 = 0;
        while e0 < n {
            let m = per_band.min(n - e0);
            let input = range.start + e0 * sk.size()..range.start + (e0 + m) * sk.size();
            let mut buf = stream.buffer(m * ok.size())?;
            file.prefetch(input.clone());
            let src = file.bytes(input.clone());
            bad += self.pool.install(|| engine::convert(src, sk, &mut buf, ok));
            file.release(input);
            stream.send(Op::Bytes(buf))?;
            e0 += m;
        }
        Ok(bad)
    }

    fn shard(
        &self,
        stream: &mut Stream<'a, '_>,
        shard: &'a Shard,
        sp: &'a ShardPlan,
        counts: &mut Counts,
    ) -> Result<()> {
        let src = shard.file.file();
        let src_path = shard.file.path();
        match &sp.header {
            HeaderSource::Copy(r) => stream.copy(src, src_path, r.clone())?,
            HeaderSource::New(b) => {
                let mut buf = stream.buffer(b.len())?;
                buf.copy_from_slice(b);
                stream.send(Op::Bytes(buf))?;
            }
        }
        for item in &sp.items {
            match item {
                Item::Copy(r) => stream.copy(src, src_path, r.clone())?,
                Item::Compute {
                    name,
                    range,
                    info,
                    out,
                    job,
                } => match job {
                    Some(Job::Merge(terms)) => {
                        self.merge_tensor(stream, shard, name, range, info, *out, terms, counts)?
                    }
                    Some(Job::Replace { adapter, key }) => {
                        let file = self.loaded[*adapter].file();
                        let (ai, _) = file.tensor(key)?;
                        let a_range = file.range(key).expect("the tensor exists");
                        match Float::from_st(ai.dtype) {
                            Some(sk) => {
                                let bad = self.convert_tensor(stream, file, a_range, sk, *out)?;
                                self.check_overflow(bad, name, *out, "replacing", counts)?;
                            }
                            None => stream.copy(file.file(), file.path(), a_range)?,
                        }
                        counts.replaced += 1;
                    }
                    None => {
                        let sk = Float::from_st(info.dtype).expect("only float tensors are converted");
                        let bad = self.convert_tensor(stream, &shard.file, range.clone(), sk, *out)?;
                        self.check_overflow(bad, name, *out, "converting", counts)?;
                        counts.converted += 1;
                    }
                },
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------- files

/// A hidden name next to `out` for a temporary (or moved-aside) directory.
fn temp_dir_next_to(out: &Path, suffix: &str) -> Result<tempfile::TempDir> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.asymlora-");
    let parent = parent_of(out);
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(suffix)
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `config.json` with its `torch_dtype` / `dtype` set to `dtype`, or `None` when it
/// has neither (or is not a JSON object).
fn config_with_dtype(text: &str, dtype: &str) -> Option<String> {
    let mut json: serde_json::Value = serde_json::from_str(text).ok()?;
    let obj = json.as_object_mut()?;
    let mut changed = false;
    for key in ["torch_dtype", "dtype"] {
        if let Some(v) = obj.get_mut(key).filter(|v| v.is_string()) {
            *v = serde_json::Value::from(dtype);
            changed = true;
        }
    }
    changed.then(|| serde_json::to_string_pretty(&json).expect("JSON values serialise") + "\n")
}

/// Opens `path` for an fsync (Windows flushes a file only through a handle that may write).
fn open_for_sync(path: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new().read(true).write(cfg!(windows)).open(path)
}

/// `fsync`s `paths`, in parallel: the kernel has been writing them back meanwhile, and
/// flushing them together lets the device work on all at once.
fn sync_all(paths: &[PathBuf]) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || open_for_sync(p).and_then(|f| f.sync_all()).map_err(|e| Error::io(p, e))))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::io("<fsync>", std::io::Error::other("an fsync thread panicked"))))
        })
    })
}

/// Renames the finished directory `tmp` to `out` (replacing an existing `out` when
/// `force`: it is moved aside first and removed once the new one is in place).
fn publish_dir(tmp: tempfile::TempDir, out: &Path, force: bool, fsync: bool, warnings: &mut Vec<String>) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(tmp.path(), e))?;
    }
    // A directory cannot be opened as a file, hence not flushed, on Windows.
    if fsync && cfg!(unix) {
        File::open(tmp.path())
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    let exists = fs::symlink_metadata(out).is_ok();
    if exists && !force {
        return Err(Error::Exists {
            path: out.to_path_buf(),
            message: "appeared while merging; not replaced (pass --force to replace it)".into(),
        });
    }
    let tmp_path = tmp.keep();
    let result = (|| -> Result<()> {
        if exists {
            let old = temp_dir_next_to(out, ".old")?.keep();
            fs::remove_dir(&old).map_err(|e| Error::io(&old, e))?;
            fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            if let Err(e) = fs::rename(&tmp_path, out) {
                let _ = fs::rename(&old, out);
                return Err(Error::io(out, e));
            }
            let removed = if old.is_dir() {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            };
            if let Err(e) = removed {
                warnings.push(format!("could not remove the replaced output {}: {e}", old.display()));
            }
        } else {
            fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
        }
        if fsync {
            sync_parent(out)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp_path);
    }
    result
}

pub(super) fn write(
    ck: &Checkpoint,
    loaded: &[Loaded],
    plan: &Plan,
    out: &Path,
    opts: &MergeOptions,
    pool: &rayon::ThreadPool,
    observer: &mut dyn Observer,
) -> Result<MergeReport> {
    let plans: Vec<ShardPlan> = ck
        .shards
        .iter()
        .map(|s| plan_shard(s, plan, opts))
        .collect::<Result<_>>()?;
    let totals = Totals {
        bytes: plans.iter().map(|p| p.out_bytes).sum(),
        modules: plan.jobs.values().filter(|j| matches!(j, Job::Merge(_))).count(),
        files: plans.len(),
    };
    observer.start(&totals);
    // Polled once before anything is written: a caller may set up its cancellation
    // (signal handlers) on the first poll.
    if observer.cancelled() {
        return Err(Error::Cancelled);
    }
    let ctx = Ctx { loaded, opts, pool };
    let mut counts = Counts::default();
    let mut report = MergeReport {
        out: out.to_path_buf(),
        bytes: totals.bytes,
        ..Default::default()
    };
    counts.unchanged = ck
        .tensors
        .iter()
        .filter(|(name, (_, info))| !plan.jobs.contains_key(*name) && out_dtype(info.dtype, opts.dtype) == info.dtype)
        .count();

    if !ck.is_dir {
        let mut file = AtomicFile::create(out)?;
        let tmp_path = file.temp_path().to_path_buf();
        let (shard, sp) = (&ck.shards[0], &plans[0]);
        stream_to(file.file(), &tmp_path, observer, |stream| {
            ctx.shard(stream, shard, sp, &mut counts)
        })?;
        file.commit(opts.fsync, opts.force)?;
        report.files.push(
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    } else {
        let tmp = temp_dir_next_to(out, ".tmp")?;
        let mut written: Vec<PathBuf> = vec![];
        for (shard, sp) in ck.shards.iter().zip(&plans) {
            let path = tmp.path().join(&shard.name);
            let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            stream_to(&mut file, &path, observer, |stream| {
                ctx.shard(stream, shard, sp, &mut counts)
            })?;
            written.push(path);
            report.files.push(shard.name.clone());
        }
        if let Some(index) = &ck.index {
            let src = ck.path.join(&index.name);
            let dst = tmp.path().join(&index.name);
            let (old, new): (u64, u64) = plans.iter().fold((0, 0), |(o, n), p| (o + p.in_data, n + p.out_data));
            if old == new {
                fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
            } else {
                let mut json = index.json.clone();
                if let Some(total) = json.pointer_mut("/metadata/total_size") {
                    if let Some(t) = total.as_u64() {
                        *total = serde_json::Value::from((t + new).saturating_sub(old));
                    }
                }
                let text = serde_json::to_string_pretty(&json).expect("JSON values serialise") + "\n";
                fs::write(&dst, text).map_err(|e| Error::io(&dst, e))?;
            }
            written.push(dst);
            report.files.push(index.name.clone());
        }
        let dtype_changed = counts.converted > 0
            || ck
                .tensors
                .values()
                .any(|(_, i)| out_dtype(i.dtype, opts.dtype) != i.dtype);
        for other in &ck.copy {
            let dst = tmp.path().join(&other.name);
            let rewritten = match (opts.dtype, other.name == "config.json" && dtype_changed) {
                (Some(d), true) => {
                    let text = fs::read_to_string(&other.path).map_err(|e| Error::io(&other.path, e))?;
                    config_with_dtype(&text, d.name())
                }
                _ => None,
            };
            match rewritten {
                Some(text) => fs::write(&dst, text).map_err(|e| Error::io(&dst, e))?,
                None => {
                    fs::copy(&other.path, &dst).map_err(|e| Error::io(&other.path, e))?;
                }
            }
            written.push(dst);
            report.copied_files.push(other.name.clone());
        }
        if opts.fsync {
            sync_all(&written)?;
        }
        if observer.cancelled() {
            return Err(Error::Cancelled);
        }
        publish_dir(tmp, out, opts.force, opts.fsync, &mut counts.warnings)?;
    }
    report.merged = counts.merged;
    report.replaced = counts.replaced;
    report.converted = counts.converted;
    report.unchanged = counts.unchanged;
    report.nonfinite = counts.nonfinite;
    report.merged_values = counts.merged_values;
    report.recomputed = counts.recomputed;
    report.warnings = counts.warnings;
    Ok(report)
}
