//! Where a model's files come from: a diffusers folder or a single checkpoint, on disk or
//! given as byte sources (the page's Blobs), and which of a user's files loading needs.

use std::collections::BTreeMap;
use std::path::Path;

use seal_weights::{ByteSource, DiskFile};

use crate::ModelError;

/// A model's files by path relative to the model's root (`unet/config.json`, ...), each read
/// only where it is needed (a weights file one tensor at a time).
pub type Files = BTreeMap<String, Box<dyn ByteSource>>;

/// What the user gave us.
pub enum ModelSource {
    /// A diffusers folder.
    Folder(Files),
    /// An original-layout checkpoint, optionally with a diffusers folder whose configs and
    /// tokenizer describe it (as diffusers' `from_single_file(config=...)`); without one, the
    /// SD 1.x configs are inferred from the tensor shapes.
    SingleFile { name: String, bytes: Box<dyn ByteSource>, config: Option<Files> },
}

impl ModelSource {
    /// A diffusers folder or a `.safetensors` file on disk.
    pub fn from_path(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            Ok(Self::Folder(read_folder(path, true)?))
        } else {
            Ok(Self::SingleFile { name: file_name(path), bytes: Box::new(DiskFile::open(path)?), config: None })
        }
    }

    /// What the files a user gave are (relative paths, as `files_to_read` kept them): a
    /// diffusers folder, or one `.safetensors` checkpoint outside any component folder, with a
    /// diffusers folder beside it for configs and tokenizer.
    pub fn from_files(mut files: Files) -> Result<Self, ModelError> {
        let in_component = |p: &str| p.split('/').rev().nth(1).is_some_and(|dir| COMPONENT_DIRS.contains(&dir));
        let singles: Vec<String> = files.keys().filter(|p| p.ends_with(".safetensors") && !in_component(p)).cloned().collect();
        match singles.as_slice() {
            [] if files.is_empty() => Err(ModelError::Missing("no model files were given".into())),
            [] => Ok(Self::Folder(files)),
            [name] => {
                let bytes = files.remove(name).expect("listed");
                // The folder's own weights are not needed for its configs.
                files.retain(|p, _| !p.ends_with(".safetensors"));
                let config = (!files.is_empty()).then_some(files);
                Ok(Self::SingleFile { name: name.rsplit('/').next().unwrap_or(name).to_string(), bytes, config })
            }
            many => Err(ModelError::Missing(format!("{} checkpoints were given ({}); give one, or a diffusers folder", many.len(), many.join(", ")))),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// A diffusers folder's subfolders that a Stable Diffusion 1.x model is built from.
const COMPONENT_DIRS: [&str; 5] = ["unet", "text_encoder", "vae", "tokenizer", "scheduler"];

/// Which of the files a user gave (relative paths) loading needs, so nothing else is read:
/// configs, tokenizer files and `.safetensors` weights; inside a diffusers folder only its
/// components (no `safety_checker/`, `feature_extractor/`...), the full-precision weights
/// where an `.fp16` variant sits beside them, and no weights at all when a single-file
/// checkpoint came with the folder (the folder then only describes it).
pub fn files_to_read(paths: &[String]) -> Vec<String> {
    let is_weights = |p: &str| p.ends_with(".safetensors");
    let given: std::collections::BTreeSet<&str> = paths.iter().map(String::as_str).filter(|p| p.ends_with(".json") || p.ends_with(".txt") || is_weights(p)).collect();
    let roots: Vec<&str> = given.iter().filter_map(|p| p.strip_suffix("model_index.json").or_else(|| p.strip_suffix("unet/config.json"))).collect();
    fn in_folder<'a>(roots: &[&str], p: &'a str) -> Option<&'a str> {
        roots.iter().find_map(|r| p.strip_prefix(r))
    }
    let checkpoint_given = given.iter().any(|p| is_weights(p) && in_folder(&roots, p).is_none());
    given
        .iter()
        .filter(|&&p| match in_folder(&roots, p) {
            None => true,
            Some(rel) => {
                let component = rel == "model_index.json" || rel.split_once('/').is_some_and(|(dir, _)| COMPONENT_DIRS.contains(&dir));
                let full_precision_beside = p.strip_suffix(".fp16.safetensors").is_some_and(|stem| given.contains(format!("{stem}.safetensors").as_str()));
                component && !(is_weights(p) && (checkpoint_given || full_precision_beside))
            }
        })
        .map(|p| p.to_string())
        .collect()
}

/// Reads what `files_to_read` keeps of a folder on disk; without `weights`, only its configs
/// and tokenizer (a folder that describes a single-file checkpoint).
pub fn read_folder(root: &Path, weights: bool) -> Result<Files, ModelError> {
    let io = |p: &Path, e: std::io::Error| ModelError::Io { file: p.display().to_string(), message: e.to_string() };
    let mut paths = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let path = entry.map_err(|e| io(&dir, e))?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                paths.push(path.strip_prefix(root).expect("inside root").to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut files = Files::new();
    for rel in files_to_read(&paths).into_iter().filter(|p| weights || !p.ends_with(".safetensors")) {
        let path = root.join(&rel);
        let source: Box<dyn ByteSource> = match rel.ends_with(".safetensors") {
            true => Box::new(DiskFile::open(&path)?),
            false => Box::new(std::fs::read(&path).map_err(|e| io(&path, e))?),
        };
        files.insert(rel, source);
    }
    Ok(files)
}

/// Strips a common leading folder (a dropped folder's own name) so paths start at the model root.
pub fn normalize_folder(files: Files) -> Files {
    let root = files.keys().find_map(|k| k.strip_suffix("model_index.json").or_else(|| k.strip_suffix("unet/config.json"))).map(str::to_string);
    match root {
        Some(prefix) if !prefix.is_empty() => files.into_iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v))).collect(),
        _ => files,
    }
}

#[cfg(test)]
mod tests {
    use seal_weights::ByteSource;

    use super::*;
    use crate::testutil::fixtures;

    #[test]
    fn only_the_files_loading_needs_are_read() {
        let paths = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let folder = paths(&[
            "m/model_index.json",
            "m/unet/config.json",
            "m/unet/diffusion_pytorch_model.safetensors",
            "m/unet/diffusion_pytorch_model.fp16.safetensors",
            "m/text_encoder/model.fp16.safetensors",
            "m/tokenizer/vocab.json",
            "m/safety_checker/model.safetensors",
            "m/feature_extractor/preprocessor_config.json",
            "m/unet/diffusion_pytorch_model.bin",
            "m/README.md",
        ]);
        assert_eq!(
            files_to_read(&folder),
            paths(&["m/model_index.json", "m/text_encoder/model.fp16.safetensors", "m/tokenizer/vocab.json", "m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors",])
        );
        // A checkpoint with a folder that describes it: the folder's weights are not read.
        let mut with_checkpoint = folder.clone();
        with_checkpoint.push("model.safetensors".into());
        assert_eq!(files_to_read(&with_checkpoint), paths(&["m/model_index.json", "m/tokenizer/vocab.json", "m/unet/config.json", "model.safetensors"]));
        // The fixture folder loads the same through it.
        let native = read_folder(&fixtures().join("tiny-clean"), false).unwrap();
        assert!(!native.is_empty() && native.keys().all(|k| !k.ends_with(".safetensors")));
    }

    #[test]
    fn given_files_are_a_folder_or_one_checkpoint_with_its_configs() {
        let file = |names: &[&str]| names.iter().map(|n| (n.to_string(), Box::new(vec![0u8]) as Box<dyn ByteSource>)).collect::<Files>();
        let folder = file(&["m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors", "m/vae/diffusion_pytorch_model.safetensors"]);
        assert!(matches!(ModelSource::from_files(folder).unwrap(), ModelSource::Folder(f) if f.len() == 3));
        match ModelSource::from_files(file(&["ckpt/model.safetensors", "m/unet/config.json", "m/unet/diffusion_pytorch_model.safetensors"])).unwrap() {
            ModelSource::SingleFile { name, config: Some(config), .. } => {
                assert_eq!(name, "model.safetensors");
                assert_eq!(config.keys().collect::<Vec<_>>(), ["m/unet/config.json"]);
            }
            _ => panic!("a checkpoint with its folder"),
        }
        assert!(matches!(ModelSource::from_files(file(&["a.safetensors"])).unwrap(), ModelSource::SingleFile { config: None, .. }));
        let err = ModelSource::from_files(file(&["a.safetensors", "b.safetensors"])).err().unwrap().to_string();
        assert_eq!(err, "2 checkpoints were given (a.safetensors, b.safetensors); give one, or a diffusers folder");
        assert_eq!(ModelSource::from_files(Files::new()).err().unwrap().to_string(), "no model files were given");
    }
}
