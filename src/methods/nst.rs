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
/// spatially normalised channels; summed over pairs. Each mean is computed per sample first and
/// in the cheaper of two equal forms (`sum((b a^T)^2) = sum((a^T a) * (b^T b))`), so that no
/// float32 reduction runs over more than C x C or HW x HW elements whatever the widths.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let mut terms = Vec::new();
    for pair in pairs {
        let base = ctx.name(&pair.stage);
        let mut normalised = Vec::new();
        let mut channels = Vec::new();
        let mut hw = 0;
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
            channels.push(c);
            hw = h * w;
        }
        let (s, t) = (&normalised[0], &normalised[1]);
        let (c_s, c_t) = (channels[0], channels[1]);
        let b = &mut *ctx.b;
        let mut spatial_grams = std::collections::HashMap::new();
        let mut kernel_mean = |a: &str, c_a: i64, x: &str, c_x: i64, tag: &str| {
            // The HW x HW form costs HW^2 (C_a + C_x) per sample, the channel form C_a C_x HW.
            let per_sample = if hw * (c_a + c_x) < c_a * c_x {
                let mut gram = |m: &str, b: &mut crate::onnx::builder::GraphBuilder| {
                    spatial_grams
                        .entry(m.to_string())
                        .or_insert_with(|| {
                            let mt = b.transpose(m, &[0, 2, 1], &format!("{m}/spatial_t"));
                            b.matmul(&mt, m, &format!("{m}/spatial_gram"))
                        })
                        .clone()
                };
                let (ga, gx) = (gram(a, b), gram(x, b));
                let product = b.mul(&ga, &gx, &format!("{base}/{tag}/gram_product"));
                b.reduce_sum(&product, &[1, 2], &format!("{base}/{tag}/per_sample"))
            } else {
                let at = b.transpose(a, &[0, 2, 1], &format!("{base}/{tag}/transposed"));
                let product = b.matmul(x, &at, &format!("{base}/{tag}/product"));
                let kernel = b.square(&product, &format!("{base}/{tag}/kernel"));
                b.reduce_sum(&kernel, &[1, 2], &format!("{base}/{tag}/per_sample"))
            };
            let mean = b.mean_all(&per_sample, &format!("{base}/{tag}/batch_mean"));
            let size = b.scalar(&format!("{base}/{tag}/size"), (c_a * c_x) as f32);
            b.div(&mean, &size, &format!("{base}/{tag}/mean"))
        };
        let tt = kernel_mean(t, c_t, t, c_t, "k_tt");
        let ss = kernel_mean(s, c_s, s, c_s, "k_ss");
        let st = kernel_mean(s, c_s, t, c_t, "k_st");
        let two = b.scalar(&format!("{base}/two"), 2.0);
        let cross = b.mul(&st, &two, &format!("{base}/cross"));
        let same = b.add(&tt, &ss, &format!("{base}/same"));
        terms.push(b.sub(&same, &cross, &format!("{base}/mmd")));
    }
    Ok(Some(ctx.b.sum_of(&terms, &ctx.name("term"))))
}
