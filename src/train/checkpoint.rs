//! Checkpoints: every carried value (parameters, optimizer moments, running statistics) with the
//! stage, step, batch, sample count and shuffle state, in one .npz written atomically (a temporary
//! file renamed into place), so an interruption at any moment leaves the last whole checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use tract_onnx::prelude::*;

use crate::arrays;
use crate::error::{Error, Result};
use crate::onnx::io::AtomicWrite;
use crate::step::Carried;

/// The names of the checkpoint's bookkeeping arrays (int64 scalars).
const STAGE: &str = "kdgraph:stage";
const STEP: &str = "kdgraph:step";
const EPOCH: &str = "kdgraph:epoch";
const SHUFFLE: &str = "kdgraph:shuffle_state";
const BATCH: &str = "kdgraph:batch";
const SAMPLES: &str = "kdgraph:samples";

/// Where training stands: which stage (its index in the sidecar's stages), how many of its steps
/// are done, and the shuffle's state at the start of the current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: usize,
    pub step: u64,
    pub epoch: u64,
    pub shuffle_state: u64,
    pub batch: usize,
    pub samples: usize,
}

/// Writes `values` (one per `carried`, in order), `fixed` (an earlier stage's values this stage
/// keeps frozen) and `progress` to `path`, atomically.
pub fn save(
    path: &Path,
    carried: &[Carried],
    values: &[Tensor],
    fixed: &BTreeMap<String, Tensor>,
    progress: &Progress,
) -> Result<()> {
    let mut arrays: Vec<(String, Tensor)> = carried
        .iter()
        .zip(values)
        .map(|(c, v)| (c.input.clone(), v.clone()))
        .chain(fixed.iter().map(|(n, v)| (n.clone(), v.clone())))
        .collect();
    for (name, value) in [
        (STAGE, progress.stage as i64),
        (STEP, progress.step as i64),
        (EPOCH, progress.epoch as i64),
        (SHUFFLE, progress.shuffle_state as i64),
        (BATCH, progress.batch as i64),
        (SAMPLES, progress.samples as i64),
    ] {
        arrays.push((name.to_string(), tensor0(value)));
    }
    let bytes = arrays::write_npz(path, &arrays)?;
    let mut write = AtomicWrite::new();
    write.stage(path, &bytes)?;
    write.commit()
}

/// Reads a checkpoint: its progress and its arrays by name (the caller takes the carried values
/// of the checkpoint's stage with [`take_values`]; the rest are the stage's `fixed` values).
pub fn load(path: &Path) -> Result<(Progress, Vec<(String, Tensor)>)> {
    let mut arrays = arrays::read_npz(path)?;
    let mut scalar = |name: &str| -> Result<i64> {
        let position = arrays.iter().position(|(n, _)| n == name).ok_or_else(|| {
            Error::usage(format!(
                "`{}` has no array `{name}`: it is not a checkpoint written by kdgraph train",
                path.display()
            ))
        })?;
        let (_, value) = arrays.swap_remove(position);
        value
            .cast_to_scalar::<i64>()
            .map_err(|e| Error::invalid_model(format!("`{}`: array `{name}`: {e}", path.display())))
    };
    let progress = Progress {
        stage: scalar(STAGE)? as usize,
        step: scalar(STEP)? as u64,
        epoch: scalar(EPOCH)? as u64,
        shuffle_state: scalar(SHUFFLE)? as u64,
        batch: scalar(BATCH)? as usize,
        samples: scalar(SAMPLES)? as usize,
    };
    Ok((progress, arrays))
}

/// The value of each of `carried`, in order, from a checkpoint's arrays: each must be there,
/// float32, of its dims.
pub fn take_values(
    arrays: &mut Vec<(String, Tensor)>,
    carried: &[Carried],
    path: &Path,
) -> Result<Vec<Tensor>> {
    carried
        .iter()
        .map(|c| {
            let position = arrays.iter().position(|(n, _)| *n == c.input).ok_or_else(|| {
                Error::usage(format!(
                    "checkpoint `{}` has no array `{}`: it was written for another graph; resume with the graph it was written for",
                    path.display(),
                    c.input
                ))
            })?;
            let (_, value) = arrays.swap_remove(position);
            let dims = super::session::dims_of(c);
            if value.datum_type() != f32::datum_type() || value.shape() != dims.as_slice() {
                return Err(Error::usage(format!(
                    "checkpoint `{}`: array `{}` is {:?} {:?}, but the graph carries float32 {dims:?}; resume with the graph it was written for",
                    path.display(),
                    c.input,
                    value.datum_type(),
                    value.shape()
                )));
            }
            Ok(value)
        })
        .collect()
}
