//! FitNet (hints): a regressor maps one mid-level student map onto the teacher's; mean squared error.

use super::LossContext;
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::connector::{chw, size_matching_conv};
use crate::plan::{
    Connector, Layer, MethodSpec, OptionValues, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS,
};

/// RepDistiller's default `hint_layer`: `feat[2]`.
const HINT_LAYER: usize = 2;

pub static SPEC: MethodSpec = MethodSpec {
    id: "fitnet",
    taps: TapKind::Hint(HINT_LAYER),
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 100.0,
    },
    connectors,
    ..SPEC_DEFAULTS
};

fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    _options: &OptionValues,
) -> Result<Vec<Connector>> {
    let (t_c, _, _) = chw(teacher)?;
    let mut layers = size_matching_conv(teacher, student)?;
    layers.extend([Layer::BatchNorm { channels: t_c }, Layer::Relu]);
    Ok(vec![Connector {
        name: "regressor",
        side: Side::Student,
        layers,
    }])
}

/// Mean squared error between the regressed student map and the teacher map.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let regressed = ctx.tap(pair, Side::Student);
    let t = ctx.tap(pair, Side::Teacher);
    let (c, h, w) = ctx.tap_chw(pair, Side::Teacher);
    let name = ctx.name(&format!("{}/mse", pair.stage));
    Ok(Some(ctx.b.mse_staged(&regressed, &t, &[c, h, w], &name)))
}
