//! Base checkpoints: one `.safetensors` file, or a model directory holding a single
//! weights file (`model.safetensors`) or shards listed in `model.safetensors.index.json`.
//!
//! Every weights file is memory-mapped and its header checked on open; an index must
//! agree with the shards (each listed tensor in the shard it names, no tensor twice).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{SafetensorsFile, TensorInfo};

/// Name of a single-file checkpoint in a model directory (transformers' `SAFE_WEIGHTS_NAME`).
pub const WEIGHTS_NAME: &str = "model.safetensors";
/// Name of the shard index (transformers' `SAFE_WEIGHTS_INDEX_NAME`).
pub const INDEX_NAME: &str = "model.safetensors.index.json";
const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// Extensions of files holding weights in other formats: not copied to a merged
/// directory, where they would be stale (unmerged) weights.
const OTHER_WEIGHT_EXTENSIONS: [&str; 11] = [
    "bin",
    "pt",
    "pth",
    "ckpt",
    "safetensors",
    "gguf",
    "h5",
    "msgpack",
    "onnx",
    "ot",
    "npz",
];

/// One weights file of a checkpoint.
pub struct Shard {
    /// File name (relative to the directory; the file name for a single file).
    pub name: String,
    pub file: SafetensorsFile,
}

/// The shard index: its file name and parsed JSON (kept whole, to be rewritten).
pub struct Index {
    pub name: String,
    pub json: serde_json::Value,
}

/// What else a model directory holds.
pub struct OtherFile {
    pub name: String,
    pub path: PathBuf,
}

pub struct Checkpoint {
    /// The path as given.
    pub path: PathBuf,
    /// A directory (the output is a directory) or a single file (the output is a file).
    pub is_dir: bool,
    pub shards: Vec<Shard>,
    /// Every tensor: shard index and dtype/shape.
    pub tensors: BTreeMap<String, (usize, TensorInfo)>,
    pub index: Option<Index>,
    /// Regular files to copy to the output directory as they are.
    pub copy: Vec<OtherFile>,
    /// Entries not copied, with the reason.
    pub skipped: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

/// Adds a hint to the safetensors crate's message about a bad weights file.
fn checkpoint_err(e: Error) -> Error {
    match e {
        Error::Safetensors { path, message } => Error::Safetensors {
            path,
            message: format!("{message} (a corrupt or truncated checkpoint file?)"),
        },
        other => other,
    }
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            Self::open_dir(path)
        } else {
            let file = SafetensorsFile::open(path).map_err(checkpoint_err)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut ck = Checkpoint {
                path: path.to_path_buf(),
                is_dir: false,
                shards: vec![],
                tensors: BTreeMap::new(),
                index: None,
                copy: vec![],
                skipped: vec![],
                warnings: vec![],
            };
            ck.add_shard(name, file)?;
            Ok(ck)
        }
    }

    fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let mut entries: Vec<(String, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .map(|e| {
                let e = e.map_err(|err| Error::io(dir, err))?;
                Ok((e.file_name().to_string_lossy().into_owned(), e.path()))
            })
            .collect::<Result<_>>()?;
        entries.sort();
        let is_file = |name: &str| dir.join(name).is_file();
        let files: Vec<&str> = entries
            .iter()
            .filter(|(_, p)| p.is_file())
            .map(|(n, _)| n.as_str())
            .collect();
        let indexes: Vec<&str> = files.iter().copied().filter(|n| n.ends_with(INDEX_SUFFIX)).collect();
        let weights: Vec<&str> = files.iter().copied().filter(|n| n.ends_with(".safetensors")).collect();

        let mut ck = Checkpoint {
            path: dir.to_path_buf(),
            is_dir: true,
            shards: vec![],
            tensors: BTreeMap::new(),
            index: None,
            copy: vec![],
            skipped: vec![],
            warnings: vec![],
        };
        // transformers' order: a single model.safetensors first, then the index.
        let index_name = if is_file(WEIGHTS_NAME) {
            None
        } else if is_file(INDEX_NAME) {
            Some(INDEX_NAME.to_string())
        } else if indexes.len() == 1 {
            Some(indexes[0].to_string())
        } else if indexes.len() > 1 {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "holds several shard indexes ({}); pass the checkpoint as one directory each",
                    indexes.join(", ")
                ),
            ));
        } else {
            None
        };
        let mut used: BTreeSet<String> = BTreeSet::new();
        if let Some(index_name) = index_name {
            ck.open_index(dir, &index_name)?;
            used.insert(index_name);
            used.extend(ck.shards.iter().map(|s| s.name.clone()));
        } else {
            let single = if is_file(WEIGHTS_NAME) {
                WEIGHTS_NAME.to_string()
            } else if weights.len() == 1 {
                weights[0].to_string()
            } else if weights.len() > 1 {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "holds several .safetensors files ({}) but no {INDEX_NAME} saying how they form one model",
                        weights.join(", ")
                    ),
                ));
            } else {
                let hint = if is_file("adapter_config.json") {
                    " (it is a PEFT adapter directory: pass it as an ADAPTER, and the model it adapts as BASE)"
                } else if files
                    .iter()
                    .any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
                {
                    " (only pickled PyTorch weights, which asymlora never loads: convert them to safetensors first)"
                } else {
                    ""
                };
                return Err(Error::checkpoint(
                    dir,
                    format!("no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}){hint}"),
                ));
            };
            let path = dir.join(&single);
            let file = SafetensorsFile::open(&path).map_err(checkpoint_err)?;
            used.insert(single.clone());
            ck.add_shard(single, file)?;
        }

        for (name, path) in &entries {
            if used.contains(name) {
                continue;
            }
            match fs::metadata(path) {
                Err(_) => ck.skipped.push((name.clone(), "a broken link".into())),
                Ok(m) if m.is_dir() => ck.skipped.push((format!("{name}/"), "a directory".into())),
                Ok(m) if !m.is_file() => ck.skipped.push((name.clone(), "not a regular file".into())),
                Ok(_) => {
                    let ext = Path::new(name)
                        .extension()
                        .map(|e| e.to_string_lossy().to_ascii_lowercase())
                        .unwrap_or_default();
                    if OTHER_WEIGHT_EXTENSIONS.contains(&ext.as_str()) || name.ends_with(INDEX_SUFFIX) {
                        ck.skipped
                            .push((name.clone(), "weights this merge does not update".into()));
                    } else {
                        ck.copy.push(OtherFile {
                            name: name.clone(),
                            path: path.clone(),
                        });
                    }
                }
            }
        }
        Ok(ck)
    }

    fn open_index(&mut self, dir: &Path, index_name: &str) -> Result<()> {
        let index_path = dir.join(index_name);
        let text = fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(&index_path, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(&index_path, "no \"weight_map\" object"))?;
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| Error::checkpoint(&index_path, format!("weight_map[{tensor:?}] is not a file name")))?;
            if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == "." || shard == ".." {
                return Err(Error::checkpoint(
                    &index_path,
                    format!("weight_map[{tensor:?}] = {shard:?} is not a file name in this directory"),
                ));
            }
            by_shard.entry(shard.to_string()).or_default().push(tensor.clone());
        }
        if by_shard.is_empty() {
            return Err(Error::checkpoint(&index_path, "the weight_map is empty"));
        }
        let mut problems = vec![];
        for (shard, listed) in &by_shard {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::checkpoint(
                    &index_path,
                    format!("lists shard {shard}, which is missing (an incomplete download?)"),
                ));
            }
            let file = SafetensorsFile::open(&path).map_err(checkpoint_err)?;
            let names: BTreeSet<&str> = file.tensor_names().collect();
            for t in listed {
                if !names.contains(t.as_str()) {
                    problems.push(format!("{t} is listed in {shard} but is not in that file"));
                }
            }
            let unlisted: Vec<&str> = names.iter().copied().filter(|n| !map.contains_key(*n)).collect();
            if !unlisted.is_empty() {
                self.warnings.push(format!(
                    "{shard} holds {} tensor(s) the index does not list (copied as they are): {}",
                    unlisted.len(),
                    unlisted.iter().take(5).copied().collect::<Vec<_>>().join(", ")
                ));
            }
            self.add_shard(shard.clone(), file)?;
        }
        if !problems.is_empty() {
            return Err(Error::checkpoint(
                &index_path,
                format!("does not match its shards: {}", problems.join("; ")),
            ));
        }
        self.index = Some(Index {
            name: index_name.to_string(),
            json,
        });
        Ok(())
    }

    fn add_shard(&mut self, name: String, file: SafetensorsFile) -> Result<()> {
        let i = self.shards.len();
        for (tensor, info) in file.infos() {
            if let Some((other, _)) = self.tensors.get(&tensor) {
                return Err(Error::checkpoint(
                    &self.path,
                    format!("tensor {tensor:?} is in both {} and {name}", self.shards[*other].name),
                ));
            }
            self.tensors.insert(tensor, (i, info));
        }
        self.shards.push(Shard { name, file });
        Ok(())
    }
}
