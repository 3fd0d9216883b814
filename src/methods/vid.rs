//! VID (variational information distillation): a Gaussian likelihood of the teacher map under a
//! regressed mean and a learned per-channel variance.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::connector::{chw, conv};
use crate::plan::{
    Connector, Layer, MethodSpec, OptionValues, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS,
};

/// The variance floor added to softplus(log_scale).
const VARIANCE_FLOOR: f32 = 1e-5;
/// The initial variance is softplus(log_scale) + floor = 5.
const INITIAL_VARIANCE: f64 = 5.0;

pub static SPEC: MethodSpec = MethodSpec {
    id: "vid",
    taps: TapKind::StageEnds,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1.0,
    },
    pools: true,
    pool_before_connector: true,
    connectors,
    ..SPEC_DEFAULTS
};

/// conv1x1 s_C->t_C, ReLU, conv1x1, ReLU, conv1x1 (no bias); the log-scale is the method's own.
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let (s_c, _, _) = chw(student)?;
    let layers = vec![
        conv(s_c, t_c, 1, 1, false),
        Layer::Relu,
        conv(t_c, t_c, 1, 1, false),
        Layer::Relu,
        conv(t_c, t_c, 1, 1, false),
    ];
    Ok(vec![Connector {
        name: "regressor",
        side: Side::Student,
        layers,
    }])
}

/// Sum over pairs of `mean(0.5 * ((mu - t)^2 / var + log var))`, `var = softplus(log_scale) + 1e-5`.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let mut terms = Vec::new();
    for pair in pairs {
        let mean = ctx.tap(pair, Side::Student);
        let t = ctx.tap(pair, Side::Teacher);
        let (c, _, _) = chw(&pair.teacher)?;
        let base = ctx.name(&pair.stage);
        let start = ((INITIAL_VARIANCE - VARIANCE_FLOOR as f64).exp() - 1.0).ln() as f32;
        let doc = format!("vid log-scale of the variance at {}", pair.stage);
        let b = &mut *ctx.b;
        let log_scale = b.parameter(
            &format!("{base}/log_scale"),
            &[c],
            &vec![start; c as usize],
            false,
            &doc,
        );
        let softplus = b.softplus(&log_scale, &format!("{base}/softplus"));
        let floor = b.scalar(&format!("{base}/variance_floor"), VARIANCE_FLOOR);
        let variance = b.add(&softplus, &floor, &format!("{base}/variance_flat"));
        let variance = b.reshape(&variance, &[1, c, 1, 1], &format!("{base}/variance"));
        let diff = b.sub(&mean, &t, &format!("{base}/diff"));
        let squared = b.square(&diff, &format!("{base}/squared"));
        let scaled = b.div(&squared, &variance, &format!("{base}/scaled"));
        let log_variance = b.unary("Log", &variance, &format!("{base}/log_variance"));
        let inner = b.add(&scaled, &log_variance, &format!("{base}/inner"));
        let half = b.scalar(&format!("{base}/half"), 0.5);
        let nll = b.mul(&inner, &half, &format!("{base}/nll"));
        terms.push(b.mean_all(&nll, &format!("{base}/mean")));
    }
    Ok(Some(ctx.b.sum_of(&terms, &ctx.name("term"))))
}
