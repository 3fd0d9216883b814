//! PKT (probabilistic knowledge transfer): cosine-similarity distributions of the embeddings.

use super::LossContext;
use crate::error::Result;
use crate::plan::{MethodSpec, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS};

/// The reference's epsilon in the norm and the log ratio.
const EPS: f32 = 1e-7;

pub static SPEC: MethodSpec = MethodSpec {
    id: "pkt",
    taps: TapKind::Embedding,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 30000.0,
    },
    ..SPEC_DEFAULTS
};

/// `mean(Q log((Q + eps) / (P + eps)))` of the row-stochastic cosine-similarity matrices.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let taps = [
        (Side::Student, ctx.tap(pair, Side::Student)),
        (Side::Teacher, ctx.tap(pair, Side::Teacher)),
    ];
    let b = &mut *ctx.b;
    let mut distributions = Vec::new();
    for (side, x) in taps {
        let base = format!("kd/pkt/{side}_distribution");
        let norm = b.l2_norm(&x, 1, &format!("{base}/norm"));
        let eps = b.scalar(&format!("{base}/eps"), EPS);
        let padded = b.add(&norm, &eps, &format!("{base}/norm_eps"));
        let unit = b.div(&x, &padded, &format!("{base}/unit"));
        let cosine = b.batch_gram(&unit, &format!("{base}/cosine"));
        let one = b.scalar(&format!("{base}/one"), 1.0);
        let shifted = b.add(&cosine, &one, &format!("{base}/shifted"));
        let half = b.scalar(&format!("{base}/half"), 0.5);
        let similarity = b.mul(&shifted, &half, &format!("{base}/similarity"));
        let rows = b.reduce_sum(&similarity, &[1], &format!("{base}/row_sum"));
        distributions.push(b.div(&similarity, &rows, &base));
    }
    let (p, q) = (&distributions[0], &distributions[1]);
    let eps = b.scalar("kd/pkt/eps", EPS);
    let q_eps = b.add(q, &eps, "kd/pkt/q_eps");
    let p_eps = b.add(p, &eps, "kd/pkt/p_eps");
    let ratio = b.div(&q_eps, &p_eps, "kd/pkt/ratio");
    let log_ratio = b.unary("Log", &ratio, "kd/pkt/log_ratio");
    let weighted = b.mul(q, &log_ratio, "kd/pkt/weighted");
    Ok(Some(b.mean_all(&weighted, "kd/pkt/term")))
}
