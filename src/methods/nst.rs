//! NST (neuron selectivity transfer): polynomial-kernel MMD between channel activations of stage ends.

use super::LossContext;
use crate::error::Result;
use crate::plan::{MethodSpec, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS};

pub static SPEC: MethodSpec = MethodSpec {
    id: "nst",
    taps: TapKind::StageEnds,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 50.0,
    },
    pools: true,
    ..SPEC_DEFAULTS
};

/// Per pair `mean K(t,t) + mean K(s,s) - 2 mean K(s,t)` with `K(a,b) = (b a^T)^2` on
/// spatially normalised channels; summed over pairs.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let mut terms = Vec::new();
    for pair in pairs {
        let base = ctx.name(&pair.stage);
        let mut normalised = Vec::new();
        for side in [Side::Student, Side::Teacher] {
            let f = ctx.tap(pair, side);
            let (c, h, w) = ctx.tap_chw(pair, side);
            let flat = ctx
                .b
                .reshape(&f, &[-1, c, h * w], &format!("{base}/{side}_flat"));
            normalised.push(
                ctx.b
                    .l2_normalize(&flat, 2, &format!("{base}/{side}_normalised")),
            );
        }
        let (s, t) = (&normalised[0], &normalised[1]);
        let b = &mut *ctx.b;
        let mut kernel_mean = |a: &str, c: &str, tag: &str| {
            let at = b.transpose(a, &[0, 2, 1], &format!("{base}/{tag}/transposed"));
            let product = b.matmul(c, &at, &format!("{base}/{tag}/product"));
            let kernel = b.square(&product, &format!("{base}/{tag}/kernel"));
            b.mean_all(&kernel, &format!("{base}/{tag}/mean"))
        };
        let tt = kernel_mean(t, t, "k_tt");
        let ss = kernel_mean(s, s, "k_ss");
        let st = kernel_mean(s, t, "k_st");
        let two = b.scalar(&format!("{base}/two"), 2.0);
        let cross = b.mul(&st, &two, &format!("{base}/cross"));
        let same = b.add(&tt, &ss, &format!("{base}/same"));
        terms.push(b.sub(&same, &cross, &format!("{base}/mmd")));
    }
    Ok(Some(ctx.b.sum_of(&terms, &ctx.name("term"))))
}
