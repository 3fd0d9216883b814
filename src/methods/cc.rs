//! CC (correlation congruence, RepDistiller form): embeddings of both nets, product of adjacent
//! samples' absolute differences.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::connector::{embeddings_on_both_sides, feat_dim_option};
use crate::plan::{
    Connector, MethodSpec, OptionSpec, OptionValues, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS,
};

static OPTIONS: [OptionSpec; 1] = [feat_dim_option("cc-feat-dim")];

pub static SPEC: MethodSpec = MethodSpec {
    id: "cc",
    taps: TapKind::Embedding,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 0.02,
    },
    options: &OPTIONS,
    connectors,
    ..SPEC_DEFAULTS
};

/// A trainable linear to 128 on each side (the teacher-side one is trained too).
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    options: &OptionValues,
) -> Result<Vec<Connector>> {
    embeddings_on_both_sides(teacher, student, options, &[])
}

/// `mean over i < B-1 of sum_d |e_s - e_t|[i,d] * |e_s - e_t|[i+1,d]`; 0 at batch 1.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let e_s = ctx.tap(pair, Side::Student);
    let e_t = ctx.tap(pair, Side::Teacher);
    let image = ctx.image.clone();
    let b = &mut *ctx.b;
    let diff = b.sub(&e_s, &e_t, "kd/cc/diff");
    let abs = b.unary("Abs", &diff, "kd/cc/abs_diff");
    let current = b.slice(&abs, 0, 0, -1, "kd/cc/current");
    let next = b.slice(&abs, 0, 1, i64::MAX, "kd/cc/next");
    let product = b.mul(&current, &next, "kd/cc/product");
    let total = b.sum_all(&product, "kd/cc/total");
    let batch = b.batch_size(&image, "kd/cc/batch");
    let one = b.scalar("kd/cc/one", 1.0);
    let adjacent = b.sub(&batch, &one, "kd/cc/adjacent_pairs");
    let count = b.binary("Max", &adjacent, &one, "kd/cc/pair_count");
    Ok(Some(b.div(&total, &count, "kd/cc/term")))
}
