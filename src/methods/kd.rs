//! KD (Hinton et al.): KL divergence between temperature-softened teacher and student logits.

use super::LossContext;
use crate::error::Result;
use crate::plan::{MethodSpec, TapKind, TapPair, Weights, SPEC_DEFAULTS};

pub static SPEC: MethodSpec = MethodSpec {
    id: "kd",
    taps: TapKind::Logits,
    weights: Weights {
        gamma: 0.1,
        alpha: 0.9,
        beta: 0.0,
    },
    ..SPEC_DEFAULTS
};

/// `T^2/B * sum_b sum_k p_t (log p_t - log p_s)` with stable log-softmax on both sides.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let (t, s) = (ctx.teacher(pair), ctx.student(pair));
    let temperature = ctx.hyper.temperature as f32;
    let log_pt = ctx
        .b
        .log_softmax(&t, temperature, &ctx.name("teacher_log_p"));
    let log_ps = ctx
        .b
        .log_softmax(&s, temperature, &ctx.name("student_log_p"));
    let pt = ctx.b.unary("Exp", &log_pt, &ctx.name("teacher_p"));
    let gap = ctx.b.sub(&log_pt, &log_ps, &ctx.name("log_ratio"));
    let weighted = ctx.b.mul(&pt, &gap, &ctx.name("weighted"));
    let per_sample = ctx.b.reduce_sum(&weighted, &[1], &ctx.name("per_sample"));
    let mean = ctx.b.mean_all(&per_sample, &ctx.name("batch_mean"));
    let t2 = ctx
        .b
        .scalar(&ctx.name("T_squared"), temperature * temperature);
    Ok(Some(ctx.b.mul(&mean, &t2, &ctx.name("term"))))
}
