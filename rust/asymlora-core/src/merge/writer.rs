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
use crate::io::{copy_range, data_len, header_bytes, sync_parent, Appender, TensorInfo};

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

    /// The stacked factors of every term on expert `block` (the whole tensor without
    /// experts), restricted to the rows of the term's part where it has one.
    fn block_factors(
        &self,
        terms: &[super::TermRef],
        block: usize,
        rows: usize,
        cols: usize,
        precision: engine::Precision,
    ) -> Result<Factors> {
        let mut owned = Vec::with_capacity(terms.len());
        for t in terms {
            let ad = &self.loaded[t.adapter];
            let (a, mut b) = self.pool.install(|| ad.block_factors(&t.module, block))?;
            if let Some(part) = &t.part {
                // B_e is d_out x r, row-major: keep the part's rows
                b = b[part.rows.start * t.module.rank..part.rows.end * t.module.rank].to_vec();
            }
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
                d_out: t.part.as_ref().map_or(t.module.d_out, |p| p.rows.len()),
                transposed: t.module.placement.transposed,
            })
            .collect();
        Ok(Factors::build(&eterms, rows, cols, precision))
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
        // Every term splits the tensor alike (checked in the plan). The blocks (experts)
        // of this tensor: all of the module's, or the one expert whose rows it holds.
        let place = &terms[0].module.placement;
        let ([rows, cols], blocks) = match &terms[0].part {
            Some(part) => ([part.rows.len(), place.d_in], part.block..part.block + 1),
            None => (place.block_shape(), 0..place.blocks()),
        };
        let wk = Float::from_st(info.dtype).expect("merge targets checked to be float");
        let ok = Float::from_st(out).expect("float in, float out");
        let mut stats = engine::RowStats::default();
        // One block (expert) at a time: its factors, then its rows in bands.
        for (at, block) in blocks.clone().enumerate() {
            let factors = self.block_factors(terms, block, rows, cols, engine::precision(wk, ok))?;
            if rows == 0 || cols == 0 {
                continue;
            }
            let (ws, os) = (wk.size(), ok.size());
            let start = range.start + at * rows * cols * ws;
            let band_rows = (BAND_BYTES / (cols * ws.max(os))).max(1);
            let mut r0 = 0;
            while r0 < rows {
                let n = band_rows.min(rows - r0);
                let input = start + r0 * cols * ws..start + (r0 + n) * cols * ws;
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
        for t in terms {
            self.loaded[t.adapter].file().release_all(); // see release_all: fault-around
        }
        shard.file.release_all();
        return_freed_memory();
        let (rows, cols) = (rows * blocks.len(), cols);
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

/// Gives the heap's free memory back to the system after a merged tensor. glibc raises
/// its mmap threshold to the size of each large block freed, so the next tensor's factors
/// (hundreds of KiB to a few MiB, another size each time) come from the heap, which then
/// grows with the number of tensors merged instead of staying at one tensor's worth
/// (measured: +23 MiB of anonymous memory for 8x the tensors; +15 MiB with this trim,
/// which the command line removes by fixing the threshold, see `asymlora-cli`).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the heap; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
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

/// Renames the finished directory `tmp.payload` to `out`. An existing `out` (only with
/// `force`) is swapped with it in one step where the system can (Linux), so that `out`
/// is never missing, and goes with the temporary; elsewhere it is moved aside first,
/// unmarked so that no later merge removes it, and removed once the new one is in place.
fn publish_dir(tmp: Temporary, out: &Path, force: bool, fsync: bool, warnings: &mut Vec<String>) -> Result<()> {
    let payload = &tmp.payload;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(payload, fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(payload, e))?;
    }
    // A directory cannot be opened as a file, hence not flushed, on Windows.
    if fsync && cfg!(unix) {
        File::open(payload)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(payload, e))?;
    }
    let exists = fs::symlink_metadata(out).is_ok();
    if exists && !force {
        return Err(appeared(out));
    }
    if !exists {
        fs::rename(payload, out).map_err(|e| Error::io(out, e))?;
    } else if exchange(payload, out).is_err() {
        replace_aside(payload, out, warnings)?;
    }
    if fsync {
        sync_parent(out)?;
    }
    let tmp_path = tmp.dir.path().to_path_buf();
    if let Err(e) = tmp.dir.close() {
        warnings.push(format!("could not remove the temporary {}: {e}", tmp_path.display()));
    }
    Ok(())
}

/// Swaps the entries `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (a, b) = (
        CString::new(a.as_os_str().as_bytes())?,
        CString::new(b.as_os_str().as_bytes())?,
    );
    // SAFETY: two valid NUL-terminated paths; the call only renames.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Replaces `out` by `payload` in two renames: `out` to `.OUT.asymlora-*.old`, then
/// `payload` to `out`; the old one is removed after.
fn replace_aside(payload: &Path, out: &Path, warnings: &mut Vec<String>) -> Result<()> {
    let old = temp_dir_next_to(out, ".old")?.keep();
    fs::remove_dir(&old).map_err(|e| Error::io(&old, e))?;
    fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    if let Err(e) = fs::rename(payload, out) {
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
    Ok(())
}

fn appeared(out: &Path) -> Error {
    Error::Exists {
        path: out.to_path_buf(),
        message: "appeared while merging; not replaced (pass --force to replace it)".into(),
    }
}

/// Puts the finished file `tmp.payload` in place as `out`: a rename over it when
/// `force`, else a hard link, which fails if `out` exists (so nothing is clobbered
/// even if `out` appeared meanwhile). `tmp` and the payload's name in it go after.
fn publish_file(tmp: Temporary, out: &Path, force: bool, fsync: bool) -> Result<()> {
    let payload = &tmp.payload;
    if fsync {
        open_for_sync(payload)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(payload, e))?;
    }
    if force {
        fs::rename(payload, out).map_err(|e| Error::io(out, e))?;
    } else {
        match fs::hard_link(payload, out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(appeared(out)),
            // A file system without hard links: check, then rename.
            Err(_) if fs::symlink_metadata(out).is_ok() => return Err(appeared(out)),
            Err(_) => fs::rename(payload, out).map_err(|e| Error::io(out, e))?,
        }
    }
    if fsync {
        sync_parent(out)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------- temporaries

/// The file every merge temporary holds from its creation on: it marks the directory
/// as a merge's own (never a user's) and names its owner, so that a later merge into
/// the same OUT can remove it once that owner is gone (SIGKILL, power loss).
const MARKER: &str = "asymlora-merge-owner";
/// The marker's first line.
const MARKER_MAGIC: &str = "asymlora merge temporary v1";
/// Temporaries are `.{OUT name}.asymlora-{random}.tmp`.
const TEMP_SUFFIX: &str = ".tmp";

fn temp_prefix(out: &Path) -> String {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    format!(".{name}.asymlora-")
}

/// A hidden name next to `out` for a temporary (or moved-aside) directory.
fn temp_dir_next_to(out: &Path, suffix: &str) -> Result<tempfile::TempDir> {
    let parent = parent_of(out);
    tempfile::Builder::new()
        .prefix(&temp_prefix(out))
        .suffix(suffix)
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

/// The process that owns a temporary, as a later process can recognise it.
#[derive(Debug, PartialEq)]
struct Owner {
    pid: u32,
    host: String,
    /// The kernel's boot id: a different one means the owner died in a reboot.
    boot: String,
    /// The process's start time (clock ticks since boot): tells a reused PID apart.
    start: String,
}

#[cfg(target_os = "linux")]
fn proc_line(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat` (after the command name, which may hold spaces).
#[cfg(target_os = "linux")]
fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19).map(str::to_string)
}

impl Owner {
    #[cfg(target_os = "linux")]
    fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            host: proc_line("/proc/sys/kernel/hostname"),
            boot: proc_line("/proc/sys/kernel/random/boot_id"),
            start: start_time(pid).unwrap_or_default(),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn current() -> Owner {
        Owner {
            pid: std::process::id(),
            host: String::new(),
            boot: String::new(),
            start: String::new(),
        }
    }

    fn render(&self) -> String {
        format!(
            "{MARKER_MAGIC}\npid {}\nhost {}\nboot {}\nstart {}\n",
            self.pid, self.host, self.boot, self.start
        )
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut lines = text.lines();
        if lines.next()? != MARKER_MAGIC {
            return None;
        }
        let mut field = |key: &str| lines.next()?.strip_prefix(key)?.strip_prefix(' ').map(str::to_string);
        Some(Owner {
            pid: field("pid")?.parse().ok()?,
            host: field("host")?,
            boot: field("boot")?,
            start: field("start")?,
        })
    }

    /// True only when this owner is certainly not running: same host, and either
    /// another boot or no live process with its PID and start time. Anything unknown
    /// (another host, no /proc, another platform) counts as running.
    #[cfg(target_os = "linux")]
    fn is_gone(&self) -> bool {
        let me = Owner::current();
        if self.host.is_empty() || self.host != me.host || self.boot.is_empty() || me.boot.is_empty() {
            return false;
        }
        if self.boot != me.boot {
            return true;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        }
        start_time(self.pid).is_some_and(|s| !self.start.is_empty() && s != self.start)
    }

    #[cfg(not(target_os = "linux"))]
    fn is_gone(&self) -> bool {
        false
    }
}

/// A merge's temporary next to OUT: a marked hidden directory that holds the output
/// being written (`payload`, named like OUT) until it is renamed to OUT.
struct Temporary {
    /// Removed, with whatever is still in it, when dropped.
    dir: tempfile::TempDir,
    payload: PathBuf,
}

impl Temporary {
    fn create(out: &Path, fsync: bool) -> Result<Temporary> {
        let dir = temp_dir_next_to(out, TEMP_SUFFIX)?;
        let marker = dir.path().join(MARKER);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .map_err(|e| Error::io(&marker, e))?;
        std::io::Write::write_all(&mut file, Owner::current().render().as_bytes())
            .map_err(|e| Error::io(&marker, e))?;
        if fsync {
            // So that a temporary which survives a power loss is still recognisable.
            file.sync_all().map_err(|e| Error::io(&marker, e))?;
            sync_parent(&marker)?;
        }
        let name = out
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "out".into());
        let payload = dir.path().join(name);
        Ok(Temporary { dir, payload })
    }
}

/// Removes the temporaries next to `out` left by merges into `out` whose owner is
/// gone: entries named `.{OUT}.asymlora-*.tmp` that are directories (not links) holding
/// a marker file written by this code. Returns a warning naming what was removed.
fn remove_stale(out: &Path) -> Option<String> {
    let parent = parent_of(out);
    let prefix = temp_prefix(out);
    let mut removed = vec![];
    for entry in fs::read_dir(&parent).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let random = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(TEMP_SUFFIX));
        if random.is_none_or(|r| r.is_empty()) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let marker = entry.path().join(MARKER);
        let owner = fs::symlink_metadata(&marker)
            .ok()
            .filter(|m| m.is_file() && m.len() < 4096)
            .and_then(|_| fs::read_to_string(&marker).ok())
            .and_then(|text| Owner::parse(&text));
        if let Some(owner) = owner.filter(Owner::is_gone) {
            if fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(format!("{name} (process {})", owner.pid));
            }
        }
    }
    (!removed.is_empty()).then(|| {
        format!(
            "removed {} stale temporary output(s) of interrupted merges into {}: {}",
            removed.len(),
            out.display(),
            removed.join(", ")
        )
    })
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
    counts.warnings.extend(remove_stale(out));
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
        let tmp = Temporary::create(out, opts.fsync)?;
        let mut file = File::create(&tmp.payload).map_err(|e| Error::io(&tmp.payload, e))?;
        let (shard, sp) = (&ck.shards[0], &plans[0]);
        stream_to(&mut file, &tmp.payload, observer, |stream| {
            ctx.shard(stream, shard, sp, &mut counts)
        })?;
        drop(file);
        if observer.cancelled() {
            return Err(Error::Cancelled);
        }
        publish_file(tmp, out, opts.force, opts.fsync)?;
        report.files.push(
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    } else {
        let tmp = Temporary::create(out, opts.fsync)?;
        fs::create_dir(&tmp.payload).map_err(|e| Error::io(&tmp.payload, e))?;
        let mut written: Vec<PathBuf> = vec![];
        for (shard, sp) in ck.shards.iter().zip(&plans) {
            let path = tmp.payload.join(&shard.name);
            let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            stream_to(&mut file, &path, observer, |stream| {
                ctx.shard(stream, shard, sp, &mut counts)
            })?;
            written.push(path);
            report.files.push(shard.name.clone());
        }
        if let Some(index) = &ck.index {
            let src = ck.path.join(&index.name);
            let dst = tmp.payload.join(&index.name);
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
            let dst = tmp.payload.join(&other.name);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_round_trips_and_rejects_other_text() {
        let me = Owner::current();
        assert_eq!(Owner::parse(&me.render()), Some(me));
        assert_eq!(
            Owner::parse("asymlora merge temporary v2\npid 1\nhost h\nboot b\nstart 1\n"),
            None
        );
        assert_eq!(
            Owner::parse("asymlora merge temporary v1\npid x\nhost h\nboot b\nstart 1\n"),
            None
        );
        assert_eq!(Owner::parse("asymlora merge temporary v1\npid 1\n"), None);
        assert_eq!(Owner::parse(""), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_an_owner_certainly_gone_is_gone() {
        let me = Owner::current();
        assert!(!me.start.is_empty() && !me.boot.is_empty());
        assert!(!me.is_gone(), "this process is running");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap(); // reaped: the PID names no process now
        let dead = Owner {
            pid,
            ..Owner::current()
        };
        assert!(dead.is_gone());
        let reused = Owner {
            start: "1".into(),
            ..Owner::current()
        };
        assert!(
            reused.is_gone(),
            "a live PID with another start time is another process"
        );
        let rebooted = Owner {
            boot: "another boot".into(),
            ..Owner::current()
        };
        assert!(rebooted.is_gone());
        let elsewhere = Owner {
            pid,
            host: "another host".into(),
            ..Owner::current()
        };
        assert!(!elsewhere.is_gone(), "a process on another host cannot be checked");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn remove_stale_removes_only_marked_temporaries_of_gone_owners() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let make = |name: &str, marker: Option<String>| {
            let p = dir.path().join(name);
            fs::create_dir(&p).unwrap();
            fs::write(p.join("model"), b"partial").unwrap();
            if let Some(text) = marker {
                fs::write(p.join(MARKER), text).unwrap();
            }
            p
        };
        let dead = Owner {
            pid: dead_pid,
            ..Owner::current()
        }
        .render();
        let stale = make(".model.asymlora-aaaaaa.tmp", Some(dead.clone()));
        let live = make(".model.asymlora-bbbbbb.tmp", Some(Owner::current().render()));
        let unmarked = make(".model.asymlora-cccccc.tmp", None);
        let other_out = make(".other.asymlora-dddddd.tmp", Some(dead.clone()));
        let old = make(".model.asymlora-eeeeee.old", Some(dead.clone()));
        let garbled = make(".model.asymlora-ffffff.tmp", Some(dead.replace("v1", "v9")));
        let file = dir.path().join(".model.asymlora-gggggg.tmp");
        fs::write(&file, dead.as_bytes()).unwrap();
        let message = remove_stale(&out).expect("one was removed");
        assert!(message.contains(".model.asymlora-aaaaaa.tmp"), "{message}");
        assert!(message.contains(&format!("process {dead_pid}")), "{message}");
        assert!(!stale.exists());
        for kept in [&live, &unmarked, &other_out, &old, &garbled, &file] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        assert_eq!(remove_stale(&out), None, "nothing more to remove");
    }
}
