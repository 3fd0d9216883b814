//! AT (attention transfer, p = 2): normalised spatial attention maps of every stage end.

use super::LossContext;
use crate::error::Result;
use crate::plan::{MethodSpec, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS};

pub static SPEC: MethodSpec = MethodSpec {
    id: "at",
    taps: TapKind::StageEnds,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1000.0,
    },
    pools: true,
    ..SPEC_DEFAULTS
};

/// Sum over pairs of the mean squared difference of normalised attention maps.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let mut terms = Vec::new();
    for pair in pairs {
        let mut maps = Vec::new();
        for side in [Side::Student, Side::Teacher] {
            let f = ctx.tap(pair, side);
            let base = ctx.name(&format!("{}/{side}_attention", pair.stage));
            maps.push(ctx.b.attention_map(&f, &base));
        }
        terms.push(ctx.b.mse(
            &maps[0],
            &maps[1],
            &ctx.name(&format!("{}/mse", pair.stage)),
        ));
    }
    Ok(Some(ctx.b.sum_of(&terms, &ctx.name("term"))))
}
