//! RKD (relational KD): distance and angle relations between the embeddings of a batch.

use super::LossContext;
use crate::error::Result;
use crate::onnx::builder::GraphBuilder;
use crate::plan::{MethodSpec, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS};

/// The weights of the distance and angle terms.
const DISTANCE_WEIGHT: f32 = 25.0;
const ANGLE_WEIGHT: f32 = 50.0;
/// Floor under squared distances (the reference's `clamp(min=eps)`).
const DISTANCE_FLOOR: f32 = 1e-12;

pub static SPEC: MethodSpec = MethodSpec {
    id: "rkd",
    taps: TapKind::Embedding,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1.0,
    },
    ..SPEC_DEFAULTS
};

/// `25 * smooth_l1(d_s, d_t) + 50 * smooth_l1(angle_s, angle_t)` over the batch's pairwise
/// distances (normalised by their off-diagonal mean) and triplet angles.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
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
    let off_count = b.binary("Max", &off, &one, "kd/rkd/off_diagonal_count");
    // The identity mask comes from the teacher side, which carries no gradient.
    let teacher_gram = b.batch_gram(&e_t, "kd/rkd/teacher/identity_source");
    let identity = b.unary("EyeLike", &teacher_gram, "kd/rkd/identity");
    let off_mask = b.sub(&one, &identity, "kd/rkd/off_diagonal_mask");
    let diff_s = differences(b, &e_s, "kd/rkd/student");
    let diff_t = differences(b, &e_t, "kd/rkd/teacher");
    let d_s = distances(b, &diff_s, &off_mask, &off_count, "kd/rkd/student");
    let d_t = distances(b, &diff_t, &off_mask, &off_count, "kd/rkd/teacher");
    let distance_l1 = b.smooth_l1(&d_s, &d_t, "kd/rkd/distance_smooth_l1");
    let loss_d = b.mean_all(&distance_l1, "kd/rkd/loss_distance");
    let a_s = angles(b, &diff_s, "kd/rkd/student");
    let a_t = angles(b, &diff_t, "kd/rkd/teacher");
    let angle_l1 = b.smooth_l1(&a_s, &a_t, "kd/rkd/angle_smooth_l1");
    let loss_a = b.mean_all(&angle_l1, "kd/rkd/loss_angle");
    let wd = b.scalar("kd/rkd/distance_weight", DISTANCE_WEIGHT);
    let wa = b.scalar("kd/rkd/angle_weight", ANGLE_WEIGHT);
    let weighted_d = b.mul(&loss_d, &wd, "kd/rkd/weighted_distance");
    let weighted_a = b.mul(&loss_a, &wa, "kd/rkd/weighted_angle");
    Ok(Some(b.add(&weighted_d, &weighted_a, "kd/rkd/term")))
}

/// `e_j - e_i` for every pair, shape [B, B, D].
fn differences(b: &mut GraphBuilder, e: &str, base: &str) -> String {
    let rows = b.unsqueeze(e, &[0], &format!("{base}/as_rows"));
    let cols = b.unsqueeze(e, &[1], &format!("{base}/as_cols"));
    b.sub(&rows, &cols, &format!("{base}/differences"))
}

/// Pairwise distances `sqrt(max(|e_i - e_j|^2, 1e-12))`, diagonal 0, divided by the mean of the
/// off-diagonal entries (at least 1e-12, so a batch of one gives 0). METHODS.md writes the
/// squared distance as `|e_i|^2 + |e_j|^2 - 2 e_i.e_j`; summing squared differences is the same
/// number without float32's cancellation when embeddings lie close together.
fn distances(
    b: &mut GraphBuilder,
    differences: &str,
    off_mask: &str,
    off_count: &str,
    base: &str,
) -> String {
    let squared = b.square(differences, &format!("{base}/differences_squared"));
    let summed = b.reduce_sum(&squared, &[2], &format!("{base}/distance_squared_column"));
    let axes = b.const_i64(&format!("{base}/squeeze_axes"), &[1], &[2]);
    let d2 = b.binary(
        "Squeeze",
        &summed,
        &axes,
        &format!("{base}/distance_squared"),
    );
    let floor = b.scalar(&format!("{base}/floor"), DISTANCE_FLOOR);
    let clamped = b.binary("Max", &d2, &floor, &format!("{base}/clamped"));
    let d = b.unary("Sqrt", &clamped, &format!("{base}/distance_raw"));
    let masked = b.mul(&d, off_mask, &format!("{base}/distance_off_diagonal"));
    let total = b.sum_all(&masked, &format!("{base}/distance_total"));
    let mean = b.div(&total, off_count, &format!("{base}/distance_mean"));
    let mean = b.binary(
        "Max",
        &mean,
        &floor,
        &format!("{base}/distance_mean_floored"),
    );
    b.div(&masked, &mean, &format!("{base}/distance"))
}

/// `angle[i, j, k] = <N(e_j - e_i), N(e_k - e_i)>`, flattened.
fn angles(b: &mut GraphBuilder, differences: &str, base: &str) -> String {
    let directions = b.l2_normalize(differences, 2, &format!("{base}/directions"));
    let transposed = b.transpose(&directions, &[0, 2, 1], &format!("{base}/directions_t"));
    let angle = b.matmul(&directions, &transposed, &format!("{base}/angle_matrix"));
    b.reshape(&angle, &[-1], &format!("{base}/angles"))
}
