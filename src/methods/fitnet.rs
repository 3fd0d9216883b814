//! FitNet (hints): a regressor maps one mid-level student map onto the teacher's; mean squared error.

use super::connector::{chw, size_matching_conv};
use super::LossContext;
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::TapPair;

pub struct FitNet;

/// RepDistiller's default `hint_layer`: `feat[2]`.
const HINT_LAYER: usize = 2;

impl Method for FitNet {
    fn id(&self) -> &'static str {
        "fitnet"
    }

    fn taps(&self) -> TapKind {
        TapKind::Hint(HINT_LAYER)
    }

    fn weights(&self) -> Weights {
        Weights {
            gamma: 1.0,
            alpha: 0.0,
            beta: 100.0,
        }
    }

    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
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
    fn build(&self, ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
        let pair = pairs[0];
        let regressed = ctx.tap(pair, Side::Student);
        let t = ctx.tap(pair, Side::Teacher);
        Ok(Some(ctx.b.mse(
            &regressed,
            &t,
            &ctx.name(&format!("{}/mse", pair.stage)),
        )))
    }
}
