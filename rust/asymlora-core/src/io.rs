//! safetensors files: memory-mapped reading, and atomic, streaming writing with
//! reproducible bytes.
//!
//! Writing never builds a whole file in memory: [`header_bytes`] lays out the header
//! (exactly as the safetensors crate would, with the `__metadata__` keys sorted), and
//! the tensor data is streamed after it into an [`AtomicFile`], a temporary file in the
//! destination directory that is renamed over the destination only when complete.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;
use safetensors::tensor::View;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde::ser::{SerializeMap, Serializer};

use crate::error::{Error, Result};

/// Dtype and shape of one tensor, wherever it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

/// A tensor held in memory, ready to be written.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub info: TensorInfo,
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// Checks that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(name: &str, dtype: StDtype, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        if data.len() != expected {
            return Err(Error::invalid(
                "tensors",
                format!(
                    "tensor {name:?}: {} bytes for shape {shape:?} of {dtype}, expected {expected}",
                    data.len()
                ),
            ));
        }
        Ok(OwnedTensor {
            info: TensorInfo { dtype, shape },
            data,
        })
    }

    /// The same elements under another shape of the same size (row-major, bytes as they are).
    pub fn reshaped(self, shape: Vec<usize>) -> OwnedTensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.info.shape.iter().product::<usize>(),
            "a reshape keeps the element count"
        );
        OwnedTensor {
            info: TensorInfo {
                dtype: self.info.dtype,
                shape,
            },
            data: self.data,
        }
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> StDtype {
        self.info.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.info.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// An open safetensors file: header parsed and checked on open, tensors sliced lazily.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    mmap: Mmap,
    /// Bytes before the tensor data: the 8-byte length and the JSON header.
    header_len: usize,
    metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, (TensorInfo, Range<usize>)>,
}

impl SafetensorsFile {
    /// Maps `path` and checks its header (offsets, sizes, dtypes) with the safetensors crate.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // Linux opens a directory fine and only the map fails ("No such device").
        if file.metadata().map_err(|e| Error::io(&path, e))?.is_dir() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        // SAFETY: the map is read-only; like every safetensors reader we assume the
        // file is not truncated by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |e: safetensors::SafeTensorError| Error::safetensors(&path, e.to_string());
        let st = SafeTensors::deserialize(&mmap).map_err(bad)?;
        let (header_len, header) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
        let data_start = 8 + header_len;
        let tensors = st
            .names()
            .into_iter()
            .map(|name| {
                let info = header.info(name).expect("name comes from the same header");
                let (start, end) = info.data_offsets;
                let ti = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                };
                (name.to_string(), (ti, data_start + start..data_start + end))
            })
            .collect();
        let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(SafetensorsFile {
            path,
            file,
            mmap,
            header_len: data_start,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Dtype and shape of every tensor, by name.
    pub fn infos(&self) -> BTreeMap<String, TensorInfo> {
        self.tensors.iter().map(|(k, (i, _))| (k.clone(), i.clone())).collect()
    }

    /// The open file (for kernel-side copies of byte ranges; see [`copy_range`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Byte range of the header (8-byte length and JSON) in the file.
    pub fn header_range(&self) -> Range<usize> {
        0..self.header_len
    }

    /// Every tensor with its byte range in the file, in the order of the data.
    pub fn tensors_in_file_order(&self) -> Vec<(&str, &TensorInfo, Range<usize>)> {
        let mut all: Vec<_> = self
            .tensors
            .iter()
            .map(|(name, (info, range))| (name.as_str(), info, range.clone()))
            .collect();
        all.sort_by_key(|(name, _, range)| (range.start, range.end, *name));
        all
    }

    /// Byte range of tensor `name` in the file.
    pub fn range(&self, name: &str) -> Option<Range<usize>> {
        self.tensors.get(name).map(|(_, r)| r.clone())
    }

    /// Bytes `range` of the mapped file.
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.mmap[range]
    }

    /// Maps the pages of `range` in one go before they are read (Linux 5.14+; elsewhere,
    /// or on failure, the pages fault in one by one as usual).
    pub fn prefetch(&self, range: Range<usize>) {
        #[cfg(target_os = "linux")]
        if !range.is_empty() && range.end <= self.mmap.len() {
            let _ = self
                .mmap
                .advise_range(memmap2::Advice::PopulateRead, range.start, range.len());
        }
        #[cfg(not(target_os = "linux"))]
        let _ = range;
    }

    /// Drops the mapped pages of `range` from this process's resident set (they stay
    /// in the page cache and are read back on the next access). Streaming code calls
    /// it after each piece of a large file, so resident memory stays bounded.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        if !range.is_empty() && range.end <= self.mmap.len() {
            // SAFETY: the map is a read-only, shared file mapping: MADV_DONTNEED only
            // unmaps pages, and reading them again faults the same file contents back in.
            // (The caller holds no references into `range` that it reads afterwards
            // expecting other contents; the contents cannot change.)
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }

    /// Drops every mapped page of the file from this process's resident set. Releasing
    /// each piece after use is not enough on its own: a page fault maps the neighbouring
    /// pages already in the page cache too (the kernel's fault-around, 64 KiB), so the
    /// edges of pieces released earlier come back with the next piece read and stay. A
    /// streaming pass calls this after each tensor or file, so what stays is bounded by
    /// one tensor, not by the file.
    pub fn release_all(&self) {
        self.release(0..self.mmap.len());
    }

    /// Dtype, shape and little-endian bytes of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let (info, range) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::invalid("name", format!("no tensor {name:?} in {}", self.path.display())))?;
        Ok((info, &self.mmap[range.clone()]))
    }
}

/// safetensors' own limit on the JSON header (100 MB).
const MAX_HEADER_SIZE: usize = 100_000_000;

/// The order the safetensors crate writes tensors in: larger dtypes first, then by name.
pub(crate) fn canonical_order<'a, T>(tensors: impl IntoIterator<Item = (&'a str, T)>) -> Vec<(&'a str, T)>
where
    T: AsRef<TensorInfo>,
{
    let mut all: Vec<_> = tensors.into_iter().collect();
    all.sort_by(|(ln, l), (rn, r)| r.as_ref().dtype.cmp(&l.as_ref().dtype).then(ln.cmp(rn)));
    all
}

impl AsRef<TensorInfo> for TensorInfo {
    fn as_ref(&self) -> &TensorInfo {
        self
    }
}

impl AsRef<TensorInfo> for &OwnedTensor {
    fn as_ref(&self) -> &TensorInfo {
        &self.info
    }
}

/// Bytes tensor `info` takes in a file.
pub(crate) fn data_len(info: &TensorInfo) -> usize {
    info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8
}

/// The header of a safetensors file holding `tensors`, whose data follows in this order
/// with no gaps: the 8-byte little-endian length, then the JSON header padded with
/// spaces to a multiple of 8 bytes.
///
/// The bytes are those `safetensors::serialize` writes for the same tensors in the same
/// order, except that the `__metadata__` keys are sorted (safetensors writes them in a
/// per-process random `HashMap` order), so equal content gives equal bytes.
pub(crate) fn header_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a TensorInfo)>,
    metadata: &BTreeMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    struct Header<'a> {
        metadata: &'a BTreeMap<String, String>,
        tensors: Vec<(&'a str, safetensors::tensor::TensorInfo)>,
    }
    impl serde::Serialize for Header<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
            let with_meta = !self.metadata.is_empty();
            let mut map = serializer.serialize_map(Some(self.tensors.len() + usize::from(with_meta)))?;
            if with_meta {
                map.serialize_entry("__metadata__", self.metadata)?;
            }
            for (name, info) in &self.tensors {
                map.serialize_entry(name, info)?;
            }
            map.end()
        }
    }
    let mut offset = 0usize;
    let mut names = std::collections::HashSet::new();
    let mut laid_out = Vec::new();
    for (name, info) in tensors {
        if !names.insert(name) {
            return Err(format!("tensor {name:?} is given twice"));
        }
        let n = data_len(info);
        laid_out.push((
            name,
            safetensors::tensor::TensorInfo {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let header = Header {
        metadata,
        tensors: laid_out,
    };
    let mut json = serde_json::to_vec(&header).map_err(|e| format!("cannot write the header: {e}"))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_HEADER_SIZE {
        return Err(format!(
            "the header would take {} bytes, more than safetensors allows",
            json.len()
        ));
    }
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// A file written under a temporary name in its destination directory and renamed
/// over the destination only by [`AtomicFile::commit`]. Dropped without a commit (an
/// error, a panic), the temporary file is removed: a failure never leaves a partial
/// file under the destination name.
pub(crate) struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file `.asymlora-*.tmp` next to `dest` (mode 0644 on Unix).
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix(".asymlora-").suffix(".tmp");
        // tempfile creates 0600 files; our outputs are meant to be shared like any other.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let tmp = builder.tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(AtomicFile { tmp, dest })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let path = self.tmp.path().to_path_buf();
        self.tmp.as_file_mut().write_all(bytes).map_err(|e| Error::io(path, e))
    }

    /// Flushes the data to disk when `fsync`, then renames the file over the
    /// destination (replacing it when `replace`, failing if it exists otherwise).
    pub fn commit(self, fsync: bool, replace: bool) -> Result<()> {
        if fsync {
            self.tmp
                .as_file()
                .sync_all()
                .map_err(|e| Error::io(self.tmp.path(), e))?;
        }
        let dest = self.dest;
        if replace {
            self.tmp.persist(&dest).map_err(|e| Error::io(&dest, e.error))?;
        } else {
            self.tmp
                .persist_noclobber(&dest)
                .map_err(|e| Error::io(&dest, e.error))?;
        }
        if fsync {
            sync_parent(&dest)?;
        }
        Ok(())
    }
}

/// `fsync`s the directory holding `path`, so a rename into it is on disk.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Appends bytes `offset..offset + len` of `src` to `dst` (at its current position).
/// On Linux the kernel copies the data (`copy_file_range`) without passing it through
/// user memory; elsewhere it is a plain read and write. `src`'s file position moves.
pub(crate) fn copy_range(
    src: &File,
    src_path: &Path,
    offset: u64,
    len: u64,
    dst: &mut File,
    dst_path: &Path,
) -> Result<()> {
    let mut reader = src;
    reader
        .seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(src_path, e))?;
    let copied = std::io::copy(&mut reader.take(len), dst).map_err(|e| Error::io(dst_path, e))?;
    if copied != len {
        return Err(Error::io(
            src_path,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ended after {copied} of {len} bytes at offset {offset} (truncated while open?)"),
            ),
        ));
    }
    Ok(())
}

/// Appends byte buffers to files. On Linux it hands the buffer's pages to a pipe
/// (`vmsplice`) and splices them into the file, so the kernel copies them into the page
/// cache the way `copy_file_range` does; on some virtual machines `write(2)` from user
/// memory is several times slower and far less steady than that. Elsewhere, or where the
/// file system refuses `splice`, it is a plain `write_all`.
pub(crate) struct Appender {
    #[cfg(target_os = "linux")]
    pipe: Option<splice::Pipe>,
}

impl Default for Appender {
    fn default() -> Self {
        Self::new()
    }
}

impl Appender {
    pub fn new() -> Self {
        Appender {
            #[cfg(target_os = "linux")]
            pipe: splice::Pipe::new(),
        }
    }

    /// Appends `bytes` to `file` at its current position; `bytes` may be reused as soon
    /// as this returns (the data is in the page cache by then).
    pub fn append(&mut self, file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(pipe) = &mut self.pipe {
            match pipe.append(file, bytes) {
                Ok(()) => return Ok(()),
                // Nothing of `bytes` reached the file: fall back for good.
                Err(splice::Failure::Unsupported) => self.pipe = None,
                Err(splice::Failure::Io(e)) => return Err(e),
            }
        }
        file.write_all(bytes)
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    pub enum Failure {
        /// The file refuses `splice` before any byte was written.
        Unsupported,
        Io(std::io::Error),
    }

    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        capacity: usize,
    }

    fn retry<T: Copy + PartialOrd + Default>(mut call: impl FnMut() -> T) -> Result<T, std::io::Error> {
        loop {
            let r = call();
            if r >= T::default() {
                return Ok(r);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    impl Pipe {
        pub fn new() -> Option<Pipe> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: both descriptors were just created and are owned by nobody else.
            let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // A larger pipe means fewer system calls; the default (64 KiB) works too.
            // SAFETY: fcntl on a descriptor we own.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
            // SAFETY: as above.
            let capacity = if size > 0 {
                size
            } else {
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
            };
            (capacity > 0).then_some(Pipe {
                read,
                write,
                capacity: capacity as usize,
            })
        }

        /// Drains what is in the pipe (after a failed splice), so it can be reused.
        fn drain(&mut self, mut left: usize) -> std::io::Result<()> {
            let mut scratch = vec![0u8; left.min(1 << 16)];
            while left > 0 {
                let want = left.min(scratch.len());
                // SAFETY: reading into a buffer of at least `want` bytes.
                let n = retry(|| unsafe { libc::read(self.read.as_raw_fd(), scratch.as_mut_ptr().cast(), want) })?;
                if n == 0 {
                    break;
                }
                left -= n as usize;
            }
            Ok(())
        }

        pub fn append(&mut self, file: &mut File, bytes: &[u8]) -> Result<(), Failure> {
            let mut first = true;
            let mut off = 0;
            while off < bytes.len() {
                let len = self.capacity.min(bytes.len() - off);
                let iov = libc::iovec {
                    iov_base: bytes[off..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                };
                // SAFETY: `iov` points into `bytes`, which outlives the call; the pipe
                // only references those pages until the splices below have copied them
                // into the file (the loop drains the pipe before returning), and
                // `bytes` is borrowed, hence unchanged, until then.
                let mut queued = retry(|| unsafe { libc::vmsplice(self.write.as_raw_fd(), &iov, 1, 0) })
                    .map_err(Failure::Io)? as usize;
                while queued > 0 {
                    // SAFETY: splicing between descriptors we hold, file position implied.
                    let moved = retry(|| unsafe {
                        libc::splice(
                            self.read.as_raw_fd(),
                            std::ptr::null_mut(),
                            file.as_raw_fd(),
                            std::ptr::null_mut(),
                            queued,
                            libc::SPLICE_F_MOVE,
                        )
                    });
                    match moved {
                        Ok(0) => return Err(Failure::Io(std::io::ErrorKind::WriteZero.into())),
                        Ok(n) => {
                            queued -= n as usize;
                            off += n as usize;
                            first = false;
                        }
                        Err(e)
                            if first
                                && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) =>
                        {
                            self.drain(queued).map_err(Failure::Io)?;
                            return Err(Failure::Unsupported);
                        }
                        Err(e) => return Err(Failure::Io(e)),
                    }
                }
            }
            Ok(())
        }
    }
}

/// Writes `tensors` and `metadata` as a safetensors file at `path`, atomically.
///
/// The bytes depend only on the content (the tensors in safetensors' order, header
/// keys sorted). The header and then each tensor are streamed into a temporary file in
/// the destination directory, which is renamed over `path` at the end, so a failure
/// never leaves a partial file under the final name.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let ordered = canonical_order(tensors.iter().map(|(k, t)| (k.as_str(), t)));
    let header = header_bytes(ordered.iter().map(|(k, t)| (*k, &t.info)), metadata)
        .map_err(|e| Error::safetensors(path, format!("cannot serialise: {e}")))?;
    let mut out = AtomicFile::create(path)?;
    out.write_all(&header)?;
    for (_, tensor) in &ordered {
        out.write_all(&tensor.data)?;
    }
    out.commit(true, true)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn tensor(dtype: StDtype, shape: Vec<usize>, seed: u8) -> OwnedTensor {
        let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let data = (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        OwnedTensor::new("t", dtype, shape, data).unwrap()
    }

    /// Our streamed files are the bytes `safetensors::serialize` produces, with the
    /// metadata keys sorted.
    #[test]
    fn streamed_file_matches_safetensors_serialize() {
        let tensors: BTreeMap<String, OwnedTensor> = [
            ("b.weight".to_string(), tensor(StDtype::BF16, vec![3, 5], 1)),
            ("a.weight".to_string(), tensor(StDtype::F32, vec![2, 2], 2)),
            ("c.bias".to_string(), tensor(StDtype::F64, vec![3], 3)),
            ("d.ids".to_string(), tensor(StDtype::I64, vec![1, 3], 4)),
            ("e.empty".to_string(), tensor(StDtype::F16, vec![0, 4], 5)),
        ]
        .into();
        for metadata in [
            BTreeMap::new(),
            BTreeMap::from([("format".to_string(), "pt".to_string())]),
            (0..20).map(|i| (format!("key{i}"), format!("v{i}"))).collect(),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.safetensors");
            write_safetensors(&path, &tensors, &metadata).unwrap();
            let ours = std::fs::read(&path).unwrap();

            let hm: HashMap<String, String> = metadata.clone().into_iter().collect();
            let theirs = safetensors::serialize(tensors.iter(), (!hm.is_empty()).then_some(hm)).unwrap();
            assert_eq!(ours.len(), theirs.len());
            if metadata.len() <= 1 {
                assert_eq!(ours, theirs, "no map order involved: identical bytes");
            }
            let reread = SafetensorsFile::open(&path).unwrap();
            assert_eq!(reread.metadata(), &metadata);
            for (name, t) in &tensors {
                let (info, bytes) = reread.tensor(name).unwrap();
                assert_eq!(info, &t.info);
                assert_eq!(bytes, &t.data[..]);
            }
            // Sorted metadata: writing again gives the same bytes.
            write_safetensors(&path, &tensors, &metadata).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), ours);
            // and the data follows the header in safetensors' order
            let order: Vec<_> = reread.tensors_in_file_order().into_iter().map(|(n, _, _)| n).collect();
            assert_eq!(order, ["d.ids", "c.bias", "a.weight", "b.weight", "e.empty"]);
        }
    }

    #[test]
    fn header_bytes_refuses_duplicates() {
        let info = TensorInfo {
            dtype: StDtype::F32,
            shape: vec![1],
        };
        let err = header_bytes([("a", &info), ("a", &info)], &BTreeMap::new()).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn atomic_file_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.safetensors");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit(false, false).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        let mut g = AtomicFile::create(&dest).unwrap();
        g.write_all(b"again").unwrap();
        assert!(g.commit(false, false).is_err(), "no clobbering unless asked");
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn appender_appends_in_order_with_other_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut file = File::create(&path).unwrap();
        let mut app = Appender::new();
        let big: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
        app.append(&mut file, b"head").unwrap();
        app.append(&mut file, &big).unwrap();
        file.write_all(b"-mid-").unwrap();
        app.append(&mut file, &[]).unwrap();
        app.append(&mut file, b"tail").unwrap();
        drop(file);
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"-mid-tail");
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn copy_range_copies_exactly_and_detects_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, (0..=255u8).collect::<Vec<_>>()).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("dst");
        let mut dst = File::create(&dst_path).unwrap();
        copy_range(&src, &src_path, 10, 5, &mut dst, &dst_path).unwrap();
        copy_range(&src, &src_path, 0, 2, &mut dst, &dst_path).unwrap();
        assert_eq!(std::fs::read(&dst_path).unwrap(), [10, 11, 12, 13, 14, 0, 1]);
        let err = copy_range(&src, &src_path, 250, 10, &mut dst, &dst_path).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
