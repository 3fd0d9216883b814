//! RKD (relational KD): distance and angle relations between the embeddings of a batch.

use super::{LossContext, Method, Side, TapKind, Weights};
use crate::error::Result;
use crate::onnx::builder::GraphBuilder;
use crate::plan::TapPair;

pub struct Rkd;

/// The weights of the distance and angle terms.
const DISTANCE_WEIGHT: f32 = 25.0;
const ANGLE_WEIGHT: f32 = 50.0;
/// Floor under squared distances (the reference's `clamp(min=eps)`).
const DISTANCE_FLOOR: f32 = 1e-12;

impl Method for Rkd {
    fn id(&self) -> &'static str {
        "rkd"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn weights(&self) -> Weights {
        Weights {
            gamma: 1.0,
            alpha: 0.0,
            beta: 1.0,
        }
    }

    /// `25 * smooth_l1(d_s, d_t) + 50 * smooth_l1(angle_s, angle_t)` over the batch's pairwise
    /// distances (normalised by their off-diagonal mean) and triplet angles.
    fn build(&self, ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
        let pair = pairs[0];
        let e_s = ctx.tap(pair, Side::Student);
        let e_t = ctx.tap(pair, Side::Teacher);
        let image = ctx.image.clone();
        let b = &mut *ctx.b;
        let batch = b.batch_size(&image, "kd/rkd/batch");
        // Off-diagonal entries: B^2 - B, at least 1 so that batch 1 gives 0 instead of NaN.
        let squared_batch = b.square(&batch, "kd/rkd/batch_squared");
        let off = b.sub(&squared_batch, &batch, "kd/rkd/off_diagonal");
        let one = b.scalar("kd/rkd/one", 1.0);
        let off_count = b.op("Max", &[&off, &one], vec![], "kd/rkd/off_diagonal_count");
        // The identity mask comes from the teacher side, which carries no gradient.
        let teacher_gram = b.batch_gram(&e_t, "kd/rkd/teacher/identity_source");
        let identity = b.unary("EyeLike", &teacher_gram, "kd/rkd/identity");
        let off_mask = b.sub(&one, &identity, "kd/rkd/off_diagonal_mask");
        let d_s = distances(b, &e_s, &off_mask, &off_count, "kd/rkd/student");
        let d_t = distances(b, &e_t, &off_mask, &off_count, "kd/rkd/teacher");
        let distance_l1 = b.smooth_l1(&d_s, &d_t, "kd/rkd/distance_smooth_l1");
        let loss_d = b.mean_all(&distance_l1, "kd/rkd/loss_distance");
        let a_s = angles(b, &e_s, "kd/rkd/student");
        let a_t = angles(b, &e_t, "kd/rkd/teacher");
        let angle_l1 = b.smooth_l1(&a_s, &a_t, "kd/rkd/angle_smooth_l1");
        let loss_a = b.mean_all(&angle_l1, "kd/rkd/loss_angle");
        let wd = b.scalar("kd/rkd/distance_weight", DISTANCE_WEIGHT);
        let wa = b.scalar("kd/rkd/angle_weight", ANGLE_WEIGHT);
        let weighted_d = b.mul(&loss_d, &wd, "kd/rkd/weighted_distance");
        let weighted_a = b.mul(&loss_a, &wa, "kd/rkd/weighted_angle");
        Ok(Some(b.add(&weighted_d, &weighted_a, "kd/rkd/term")))
    }
}

/// Pairwise distances `sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12))`, diagonal 0, divided by
/// the mean of the off-diagonal entries.
fn distances(b: &mut GraphBuilder, e: &str, off_mask: &str, off_count: &str, base: &str) -> String {
    let squared = b.square(e, &format!("{base}/squared"));
    let norms = b.reduce_sum(&squared, &[1], &format!("{base}/squared_norms"));
    let norms_row = b.transpose(&norms, &[1, 0], &format!("{base}/squared_norms_row"));
    let gram = b.batch_gram(e, &format!("{base}/gram"));
    let two = b.scalar(&format!("{base}/two"), 2.0);
    let twice = b.mul(&gram, &two, &format!("{base}/twice_gram"));
    let sum = b.add(&norms, &norms_row, &format!("{base}/norm_sum"));
    let d2 = b.sub(&sum, &twice, &format!("{base}/distance_squared"));
    let floor = b.scalar(&format!("{base}/floor"), DISTANCE_FLOOR);
    let clamped = b.op("Max", &[&d2, &floor], vec![], &format!("{base}/clamped"));
    let d = b.unary("Sqrt", &clamped, &format!("{base}/distance_raw"));
    let masked = b.mul(&d, off_mask, &format!("{base}/distance_off_diagonal"));
    let total = b.sum_all(&masked, &format!("{base}/distance_total"));
    let mean = b.div(&total, off_count, &format!("{base}/distance_mean"));
    b.div(&masked, &mean, &format!("{base}/distance"))
}

/// `angle[i, j, k] = <N(e_j - e_i), N(e_k - e_i)>`, flattened.
fn angles(b: &mut GraphBuilder, e: &str, base: &str) -> String {
    let rows = b.unsqueeze(e, &[0], &format!("{base}/as_rows"));
    let cols = b.unsqueeze(e, &[1], &format!("{base}/as_cols"));
    let differences = b.sub(&rows, &cols, &format!("{base}/differences"));
    let directions = b.l2_normalize(&differences, 2, &format!("{base}/directions"));
    let transposed = b.transpose(&directions, &[0, 2, 1], &format!("{base}/directions_t"));
    let angle = b.matmul(&directions, &transposed, &format!("{base}/angle_matrix"));
    b.reshape(&angle, &[-1], &format!("{base}/angles"))
}
