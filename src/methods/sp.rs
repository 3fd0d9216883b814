//! SP (similarity preserving): batch similarity matrices of the last spatial map.

use super::LossContext;
use crate::error::Result;
use crate::plan::{MethodSpec, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS};

pub static SPEC: MethodSpec = MethodSpec {
    id: "sp",
    taps: TapKind::LastSpatial,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 3000.0,
    },
    ..SPEC_DEFAULTS
};

/// `sum((N(G_t) - N(G_s))^2) / B^2` with `G = Q Q^T` of the flattened maps.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let mut grams = Vec::new();
    for side in [Side::Student, Side::Teacher] {
        let f = ctx.tap(pair, side);
        let base = ctx.name(&format!("{}/{side}_similarity", pair.stage));
        let flat = ctx.b.op("Flatten", &[&f], vec![], &format!("{base}/flat"));
        let gram = ctx.b.batch_gram(&flat, &format!("{base}/gram"));
        grams.push(ctx.b.l2_normalize(&gram, 1, &base));
    }
    Ok(Some(ctx.b.mse(&grams[1], &grams[0], &ctx.name("term"))))
}
