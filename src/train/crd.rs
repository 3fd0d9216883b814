//! CRD's inputs in kdgraph train: the memory banks and Z it carries from step to step (the banks
//! initialised as RepDistiller does, uniform in +-1/sqrt(dim/3)), and per batch the sample indices
//! and the contrast indices (the sample, then negatives drawn without replacement from samples of
//! other classes, RepDistiller's `exact` mode), all from splitmix64 streams of the seed, so that
//! examples/train_onnxruntime.py draws the same.

use tract_onnx::prelude::*;

use super::data::{mix, Shuffle, GOLDEN};
use crate::analysis::Dim;
use crate::error::{Error, Result};
use crate::sidecar::TrainingSidecar;
use crate::step::{Carried, Initial};

// The names src/methods/crd.rs gives CRD's inputs.
pub const INDEX: &str = "kd/crd/index";
pub const CONTRAST_INDEX: &str = "kd/crd/contrast_index";
const MEMORY_STUDENT: &str = "kd/crd/memory_student";
const MEMORY_TEACHER: &str = "kd/crd/memory_teacher";
const Z: &str = "kd/crd/z";

/// Where the streams start: the seed xor these ("memory", "contrast" in ASCII).
const MEMORY_STREAM: u64 = 0x6d65_6d6f_7279;
const CONTRAST_STREAM: u64 = 0x636f_6e74_7261_7374;

/// CRD's sizes in a stage graph, and the seed of its draws.
pub struct Crd {
    n_data: usize,
    negatives: usize,
    feat_dim: usize,
    seed: u64,
}

impl Crd {
    /// CRD's sizes from the shapes of its inputs in the stage's sidecar (None: no CRD there).
    pub fn of(sidecar: &TrainingSidecar, seed: u64, shown: &str) -> Result<Option<Crd>> {
        if !sidecar.inputs.iter().any(|i| i.name == MEMORY_STUDENT) {
            return Ok(None);
        }
        let dims = |name: &str| -> Vec<Option<usize>> {
            let role = sidecar.inputs.iter().find(|i| i.name == name);
            role.map_or_else(Vec::new, |r| {
                r.shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) if *n > 0 => Some(*n as usize),
                        _ => None,
                    })
                    .collect()
            })
        };
        let (memory, contrast) = (dims(MEMORY_STUDENT), dims(CONTRAST_INDEX));
        let (&[Some(n_data), Some(feat_dim)], Some(&Some(columns))) =
            (memory.as_slice(), contrast.last())
        else {
            return Err(Error::invalid_model(format!(
                "the sidecar of `{shown}` gives CRD's inputs `{MEMORY_STUDENT}` and `{CONTRAST_INDEX}` no fixed (N, dim) and K + 1; run kdgraph merge again"
            )));
        };
        if columns < 2 {
            return Err(Error::invalid_model(format!(
                "the sidecar of `{shown}` gives `{CONTRAST_INDEX}` no column for negatives; run kdgraph merge again"
            )));
        }
        Ok(Some(Crd {
            n_data,
            negatives: columns - 1,
            feat_dim,
            seed,
        }))
    }

    /// The columns of the contrast indices: the sample and its K negatives.
    pub fn columns(&self) -> usize {
        self.negatives + 1
    }

    /// The data set must hold the samples the memories were built for (`labels`: each sample's, by
    /// sample id), of at least two classes.
    pub fn check_data(&self, labels: &[i64], shown: &str) -> Result<()> {
        if labels.len() != self.n_data {
            return Err(Error::invalid_model(format!(
                "`{shown}` holds {} samples, but CRD's memory banks hold {} (merge --crd-n-data); merge again with --crd-n-data {}",
                labels.len(),
                self.n_data,
                labels.len()
            )));
        }
        if labels.iter().all(|&l| l == labels[0]) {
            return Err(Error::invalid_model(format!(
                "`{shown}`: every sample is of class {}, but CRD draws its negatives from other classes; give data of two classes or more",
                labels[0]
            )));
        }
        Ok(())
    }

    /// The values CRD carries from step to step, fed as `<name>` and returned as `<name>_next`.
    /// Like the optimizer's moments they are no initializer (`Initial::Zeros`): no stage passes
    /// them on and the student does not hold them; their first values are [`Crd::initial_state`].
    pub fn state(&self) -> Vec<Carried> {
        let memory = vec![self.n_data as i64, self.feat_dim as i64];
        [
            (MEMORY_STUDENT, memory.clone()),
            (MEMORY_TEACHER, memory),
            (Z, vec![2]),
        ]
        .into_iter()
        .map(|(name, dims)| Carried {
            input: name.to_string(),
            output: format!("{name}_next"),
            initial: Initial::Zeros,
            dims,
        })
        .collect()
    }

    /// The first values of [`Crd::state`]: the student's memory then the teacher's, row by row,
    /// `bound * (2u - 1)` with `u` the top 24 bits of the memory stream's outputs over 2^24 and
    /// `bound = 1 / sqrt(dim / 3)` (float32); Z is -1 (estimated on the first batch).
    pub fn initial_state(&self) -> Vec<(String, Tensor)> {
        let mut stream = Shuffle::seeded(self.seed ^ MEMORY_STREAM);
        let bound = 1.0f32 / (self.feat_dim as f32 / 3.0).sqrt();
        let count = self.n_data * self.feat_dim;
        let mut memory = || -> Tensor {
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    let u = (stream.next() >> 40) as f32 / (1u64 << 24) as f32;
                    bound * (2.0 * u - 1.0)
                })
                .collect();
            Tensor::from_shape(&[self.n_data, self.feat_dim], &values).expect("n_data x dim values")
        };
        let student = memory();
        let teacher = memory();
        vec![
            (MEMORY_STUDENT.to_string(), student),
            (MEMORY_TEACHER.to_string(), teacher),
            (Z.to_string(), tensor1(&[-1.0f32, -1.0])),
        ]
    }

    /// The contrast indices of the batch of samples `indices` (sample ids, `labels` by id) at step
    /// `step` (1 first), (B, K + 1): the sample, then K samples of other classes. Row `r` draws
    /// from the stream seeded with `mix(mix((seed ^ CONTRAST_STREAM) + step) + r)`: each
    /// candidate's key is the stream's output at its sample index (`mix(row + (n + 1) *
    /// GOLDEN)`, distinct for distinct samples), and the K candidates of the smallest keys,
    /// smallest first, are the negatives. Where fewer than K samples are of other classes, they
    /// are drawn with replacement (as RepDistiller does): the j-th negative is candidate
    /// `key(j) % count` in sample order.
    pub fn contrast_index(&self, labels: &[i64], indices: &[usize], step: u64) -> Tensor {
        let k = self.negatives;
        let stream = mix((self.seed ^ CONTRAST_STREAM).wrapping_add(step));
        let mut rows = Vec::with_capacity(indices.len() * (k + 1));
        for (row, &sample) in indices.iter().enumerate() {
            let row_state = mix(stream.wrapping_add(row as u64));
            let key = |n: usize| mix(row_state.wrapping_add((n as u64 + 1).wrapping_mul(GOLDEN)));
            let class = labels[sample];
            let mut pool: Vec<(u64, usize)> = labels
                .iter()
                .enumerate()
                .filter(|(_, &l)| l != class)
                .map(|(n, _)| (key(n), n))
                .collect();
            rows.push(sample as i64);
            if pool.len() >= k {
                if pool.len() > k {
                    pool.select_nth_unstable(k - 1);
                    pool.truncate(k);
                }
                pool.sort_unstable();
                rows.extend(pool.iter().map(|&(_, n)| n as i64));
            } else {
                let count = pool.len() as u64;
                rows.extend((0..k).map(|j| pool[(key(j) % count) as usize].1 as i64));
            }
        }
        Tensor::from_shape(&[indices.len(), k + 1], &rows).expect("B x (K + 1) indices")
    }
}
