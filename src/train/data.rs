//! The training data set (`x` (N, C, H, W) float32 images, `y` (N,) int64 labels, optionally `id`
//! (N,) int64 sample ids, one .npz) and its seeded shuffle into batches of a fixed size.

use std::path::Path;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{ArrayD, Axis};

use crate::arrays;
use crate::error::{Error, Result};

/// Images and labels, checked against what the graph takes, and which sample each row shows.
pub struct DataSet {
    images: ArrayD<f32>,
    labels: Vec<i64>,
    /// Where the file gives `id`: which sample each row shows (None: each row its own sample).
    samples: Option<Samples>,
}

/// The samples of a file with an `id` array (a file of augmented views holds one sample in
/// several rows). CRD keeps one memory row per sample and draws its negatives among samples.
struct Samples {
    /// The sample id of each row.
    ids: Vec<usize>,
    /// The label of each sample, by id.
    labels: Vec<i64>,
}

/// What the graph takes: one image's (C, H, W), the class count, and the batch size.
pub struct Expected<'a> {
    pub image_dims: &'a [usize],
    pub classes: i64,
    pub batch: usize,
}

impl DataSet {
    /// Reads `path` (`x` and `y`) and checks it fits `expected`.
    pub fn load(path: &Path, expected: &Expected) -> Result<DataSet> {
        let shown = path.display().to_string();
        let mut arrays = arrays::read_npz(path)?;
        let images = take(&mut arrays, "x", &shown)?;
        let labels = take(&mut arrays, "y", &shown)?;
        let images = float_images(images, expected.image_dims, &shown)?;
        let labels = int_labels(labels, images.shape()[0], expected.classes, &shown)?;
        let samples = take_optional(&mut arrays, "id")
            .map(|ids| sample_ids(ids, &labels, &shown))
            .transpose()?;
        let count = labels.len();
        if count == 0 {
            return Err(Error::invalid_model(format!(
                "`{shown}` holds no samples; give a data set with at least one batch"
            )));
        }
        if count < expected.batch {
            return Err(Error::invalid_model(format!(
                "`{shown}` holds {count} samples, fewer than one batch of {}; pass a smaller --batch",
                expected.batch
            )));
        }
        Ok(DataSet {
            images,
            labels,
            samples,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The images and labels of the samples at `indices`.
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Tensor) {
        let images = self.images.select(Axis(0), indices).into_tensor();
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        (images, tensor1(&labels))
    }

    /// The images of samples `start..start + count`, padded with zero images to `batch`.
    pub fn padded_images(&self, start: usize, count: usize, batch: usize) -> Tensor {
        let indices: Vec<usize> = (start..start + count).collect();
        let mut images = self.images.select(Axis(0), &indices);
        if count < batch {
            let mut shape = images.shape().to_vec();
            shape[0] = batch - count;
            let zeros = ArrayD::<f32>::zeros(shape);
            images = tract_onnx::tract_core::ndarray::concatenate(
                Axis(0),
                &[images.view(), zeros.view()],
            )
            .expect("same image dims");
        }
        images.into_tensor()
    }

    pub fn label(&self, index: usize) -> i64 {
        self.labels[index]
    }

    /// The sample id of row `index` (the row itself unless the file gives `id`).
    pub fn sample_id(&self, index: usize) -> usize {
        self.samples.as_ref().map_or(index, |s| s.ids[index])
    }

    /// The label of each sample, by sample id (each row's label unless the file gives `id`).
    pub fn sample_labels(&self) -> &[i64] {
        self.samples.as_ref().map_or(&self.labels, |s| &s.labels)
    }
}

fn take(arrays: &mut Vec<(String, Tensor)>, name: &str, shown: &str) -> Result<Tensor> {
    take_optional(arrays, name).ok_or_else(|| {
        Error::invalid_model(format!(
            "`{shown}` has no array `{name}`; save images as `x` (N, C, H, W) float32 and labels as `y` (N,) int64"
        ))
    })
}

fn take_optional(arrays: &mut Vec<(String, Tensor)>, name: &str) -> Option<Tensor> {
    let position = arrays.iter().position(|(n, _)| n == name)?;
    Some(arrays.swap_remove(position).1)
}

/// The `id` array: one int64 per row, the ids 0..M each shown by some row, each with one label.
fn sample_ids(ids: Tensor, labels: &[i64], shown: &str) -> Result<Samples> {
    let count = labels.len();
    if ids.datum_type() != i64::datum_type() || ids.shape() != [count] {
        return Err(Error::invalid_model(format!(
            "`{shown}`: array `id` is {:?} of shape {:?}; save one sample id per image as int64, shape ({count},)",
            ids.datum_type(),
            ids.shape()
        )));
    }
    let ids = int64_values(&ids, "id", shown)?;
    if let Some((row, bad)) = ids.iter().enumerate().find(|(_, &id)| id < 0) {
        return Err(Error::invalid_model(format!(
            "`{shown}`: id[{row}] = {bad} is negative; number the samples 0, 1, 2, ..."
        )));
    }
    let ids: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
    let mut sample_labels: Vec<Option<i64>> = vec![None; ids.iter().max().map_or(0, |m| m + 1)];
    for (row, (&id, &label)) in ids.iter().zip(labels).enumerate() {
        match sample_labels[id] {
            Some(first) if first != label => {
                return Err(Error::invalid_model(format!(
                    "`{shown}`: id[{row}] = {id} is labelled {label}, but an earlier row of sample {id} is labelled {first}; one sample id, one label"
                )));
            }
            _ => sample_labels[id] = Some(label),
        }
    }
    let labels = sample_labels
        .iter()
        .enumerate()
        .map(|(id, label)| {
            label.ok_or_else(|| {
                Error::invalid_model(format!(
                    "`{shown}`: no row has id {id}, but ids go up to {}; number the samples 0..M without gaps",
                    sample_labels.len() - 1
                ))
            })
        })
        .collect::<Result<Vec<i64>>>()?;
    Ok(Samples { ids, labels })
}

fn float_images(x: Tensor, image_dims: &[usize], shown: &str) -> Result<ArrayD<f32>> {
    if x.datum_type() != f32::datum_type() {
        return Err(Error::invalid_model(format!(
            "`{shown}`: array `x` is {:?}, not float32; save it as x.astype(np.float32)",
            x.datum_type()
        )));
    }
    if x.rank() != 1 + image_dims.len() || x.shape()[1..] != *image_dims {
        return Err(Error::invalid_model(format!(
            "`{shown}`: array `x` has shape {:?}, but the graph takes images of (N, {}); save x in that shape",
            x.shape(),
            image_dims
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    x.into_plain_array::<f32>()
        .map_err(|e| Error::invalid_model(format!("`{shown}`: array `x`: {e}")))
}

/// The values of an int64 array named `name` in the file.
fn int64_values(array: &Tensor, name: &str, shown: &str) -> Result<Vec<i64>> {
    Ok(array
        .to_plain_array_view::<i64>()
        .map_err(|e| Error::invalid_model(format!("`{shown}`: array `{name}`: {e}")))?
        .iter()
        .copied()
        .collect())
}

fn int_labels(y: Tensor, count: usize, classes: i64, shown: &str) -> Result<Vec<i64>> {
    if y.datum_type() != i64::datum_type() {
        return Err(Error::invalid_model(format!(
            "`{shown}`: array `y` is {:?}, not int64; save it as y.astype(np.int64)",
            y.datum_type()
        )));
    }
    if y.shape() != [count] {
        return Err(Error::invalid_model(format!(
            "`{shown}`: array `y` has shape {:?}, but `x` holds {count} images; save one label per image, shape ({count},)",
            y.shape()
        )));
    }
    let labels = int64_values(&y, "y", shown)?;
    if let Some((i, bad)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| !(0..classes).contains(&l))
    {
        return Err(Error::invalid_model(format!(
            "`{shown}`: label y[{i}] = {bad} is outside 0..{classes} (the student has {classes} classes); fix the labels"
        )));
    }
    Ok(labels)
}

/// The step of splitmix64's state (the golden ratio in 64 bits).
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function: a bijection of u64 that scrambles its bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seeded order in which an epoch visits the samples: a Fisher-Yates shuffle driven by a
/// splitmix64 generator whose state a checkpoint records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shuffle {
    pub state: u64,
}

impl Shuffle {
    pub fn seeded(seed: u64) -> Shuffle {
        Shuffle { state: seed }
    }

    /// The generator's next output.
    pub fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// A permutation of 0..count.
    pub fn order(&mut self, count: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..count).collect();
        for i in (1..count).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}
