//! OFD (overhaul of feature distillation): partial L2 between connected student and margin-clipped
//! teacher pre-ReLU maps at every stage end.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::onnx::builder::GraphBuilder;
use crate::plan::connector::chw;
use crate::plan::{
    Connector, ConvInit, Layer, MethodSpec, OptionValues, Side, TapKind, TapPair, Weights,
    SPEC_DEFAULTS,
};

pub static SPEC: MethodSpec = MethodSpec {
    id: "ofd",
    taps: TapKind::StageEndsPreRelu,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1.0 / 1000.0,
    },
    pools: true,
    remark: Some("the term is the stage-weighted sum (last stage weight 1, each earlier half) divided by the batch size, with teacher maps clipped at margins from the teacher's BatchNorm"),
    connectors,
    review_pairs: Some(margin_sources),
    ..SPEC_DEFAULTS
};

/// conv1x1 (no bias, weight ~ N(0, 2/t_C)) + BN to the teacher's channels.
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let (s_c, _, _) = chw(student)?;
    let conv = Layer::Conv {
        in_channels: s_c,
        out_channels: t_c,
        kernel: [1, 1],
        stride: 1,
        pad: 0,
        bias: false,
        init: ConvInit::HeOut,
    };
    Ok(vec![Connector {
        name: "connector",
        side: Side::Student,
        layers: vec![conv, Layer::BatchNorm { channels: t_c }],
    }])
}

/// `sum_i L_i / 2^(n-i-1) / B` with `L_i = sum((s - t')^2 * 1{s > t' or t' > 0})`, `t' = max(t, margin)`.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let n = pairs.len();
    let mut terms = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        let s = ctx.tap(pair, Side::Student);
        let t = ctx.tap(pair, Side::Teacher);
        let base = ctx.name(&pair.stage);
        let margin = match &pair.teacher_batchnorm {
            Some(bn) => {
                let margins: Vec<f32> = bn
                    .gamma
                    .iter()
                    .zip(&bn.beta)
                    .map(|(&g, &b)| margin(g as f64, b as f64) as f32)
                    .collect();
                ctx.b.const_f32(
                    &format!("{base}/margin"),
                    &[1, margins.len() as i64, 1, 1],
                    &margins,
                )
            }
            None => batch_margins(ctx.b, &t, &base),
        };
        let b = &mut *ctx.b;
        let clipped = b.binary("Max", &t, &margin, &format!("{base}/teacher_clipped"));
        let above = b.binary("Greater", &s, &clipped, &format!("{base}/student_above"));
        let zero = b.scalar(&format!("{base}/zero"), 0.0);
        let positive = b.binary(
            "Greater",
            &clipped,
            &zero,
            &format!("{base}/teacher_positive"),
        );
        let either = b.binary("Or", &above, &positive, &format!("{base}/counted"));
        let mask = b.mask(&either, &format!("{base}/mask"));
        let diff = b.sub(&s, &clipped, &format!("{base}/diff"));
        let squared = b.square(&diff, &format!("{base}/squared"));
        let masked = b.mul(&squared, &mask, &format!("{base}/masked"));
        let total = b.sum_all(&masked, &format!("{base}/sum"));
        let weight = b.scalar(
            &format!("{base}/stage_weight"),
            0.5f32.powi((n - i - 1) as i32),
        );
        terms.push(b.mul(&total, &weight, &format!("{base}/weighted")));
    }
    Ok(Some(ctx.per_sample_sum(&terms)))
}

/// Where each pair's margins come from; a warning, with the remedy, where they are estimated.
fn margin_sources(pairs: &[&TapPair]) -> (Vec<String>, Vec<String>) {
    let notes = pairs
        .iter()
        .map(|pair| match &pair.teacher_batchnorm {
            Some(bn) => format!(
                "ofd {}: margins from the teacher's BatchNorm `{}` (as clovaai's)",
                pair.stage, bn.node
            ),
            None => format!(
                "ofd {}: margins are a batch estimate (the batch's mean negative response per channel): \
                 no BatchNorm feeds teacher `{}`",
                pair.stage, pair.teacher.tensor
            ),
        })
        .collect();
    let estimated = pairs
        .iter()
        .filter(|p| p.teacher_batchnorm.is_none())
        .count();
    let warnings = (estimated > 0)
        .then(|| {
            format!(
                "ofd: {estimated} of {} stages estimate their margins from the batch, since the teacher's BatchNorms \
                 were folded at export; clovaai's margins come from those BatchNorms: export the teacher keeping them, \
                 kdgraph.export_teacher(teacher, x, path) from the Python package, or torch.onnx.export(teacher.eval(), \
                 (x,), path, dynamo=True, optimize=False) (kdgraph folds them itself in the joint graph)",
                pairs.len()
            )
        })
        .into_iter()
        .collect();
    (notes, warnings)
}

/// `m - s * phi(m/s) / Phi(-m/s)` if `Phi(-m/s) > 0.001`, else `-3s`, with `s = |gamma|`, `m = beta`.
fn margin(gamma: f64, beta: f64) -> f64 {
    let s = gamma.abs();
    if s == 0.0 {
        return beta.min(0.0);
    }
    let cdf = normal_cdf(-beta / s);
    if cdf > 0.001 {
        let pdf = (-(beta / s).powi(2) / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        beta - s * pdf / cdf
    } else {
        -3.0 * s
    }
}

/// The standard normal CDF, through erfc (Numerical Recipes' erfcc, relative error < 1.2e-7).
fn normal_cdf(x: f64) -> f64 {
    let z = -x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z.abs());
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    0.5 * if z >= 0.0 { erfc } else { 2.0 - erfc }
}

/// Per-channel mean of the negative teacher responses of the batch (0 where there are none).
fn batch_margins(b: &mut GraphBuilder, t: &str, base: &str) -> String {
    let zero = b.scalar(&format!("{base}/margin_zero"), 0.0);
    let negative = b.binary("Min", t, &zero, &format!("{base}/negative_part"));
    let is_negative = b.binary("Less", t, &zero, &format!("{base}/is_negative"));
    let count_mask = b.mask(&is_negative, &format!("{base}/negative_mask"));
    let total = b.reduce_sum(&negative, &[0, 2, 3], &format!("{base}/negative_sum"));
    let count = b.reduce_sum(&count_mask, &[0, 2, 3], &format!("{base}/negative_count"));
    let one = b.scalar(&format!("{base}/margin_one"), 1.0);
    let safe = b.binary("Max", &count, &one, &format!("{base}/negative_count_safe"));
    b.div(&total, &safe, &format!("{base}/margin"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 1e-7);
        assert!((normal_cdf(-2.0) - 0.022_750_132).abs() < 1e-8);
    }

    #[test]
    fn margin_of_a_standard_normal_is_minus_sqrt_two_over_pi() {
        // E[x | x < 0] for N(0, 1) is -phi(0) / Phi(0) = -sqrt(2/pi).
        assert!((margin(1.0, 0.0) + (2.0 / std::f64::consts::PI).sqrt()).abs() < 1e-6);
        assert_eq!(margin(1.0, 10.0), -3.0);
    }
}
