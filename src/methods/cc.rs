//! CC (correlation congruence, RepDistiller form): embeddings of both nets, product of adjacent
//! samples' absolute differences.

use super::connector::features;
use super::LossContext;
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::TapPair;

pub struct Cc;

/// RepDistiller's `feat_dim`.
const EMBED_DIM: i64 = 128;

impl Method for Cc {
    fn id(&self) -> &'static str {
        "cc"
    }

    fn taps(&self) -> TapKind {
        TapKind::Embedding
    }

    fn weights(&self) -> Weights {
        Weights {
            gamma: 1.0,
            alpha: 0.0,
            beta: 0.02,
        }
    }

    /// A trainable linear to 128 on each side (the teacher-side one is trained too).
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let linear = |info: &TensorInfo| -> Result<Vec<Layer>> {
            Ok(vec![Layer::Linear {
                in_features: features(info)?,
                out_features: EMBED_DIM,
            }])
        };
        Ok(vec![
            Connector {
                name: "embed",
                side: Side::Student,
                layers: linear(student)?,
            },
            Connector {
                name: "embed",
                side: Side::Teacher,
                layers: linear(teacher)?,
            },
        ])
    }

    /// `mean over i < B-1 of sum_d |e_s - e_t|[i,d] * |e_s - e_t|[i+1,d]`; 0 at batch 1.
    fn build(&self, ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
        let pair = pairs[0];
        let e_s = ctx.tap(pair, Side::Student);
        let e_t = ctx.tap(pair, Side::Teacher);
        let image = ctx.image.clone();
        let b = &mut *ctx.b;
        let diff = b.sub(&e_s, &e_t, "kd/cc/diff");
        let abs = b.unary("Abs", &diff, "kd/cc/abs_diff");
        let current = b.slice(&abs, 0, 0, -1, "kd/cc/current");
        let next = b.slice(&abs, 0, 1, i64::MAX, "kd/cc/next");
        let product = b.mul(&current, &next, "kd/cc/product");
        let total = b.sum_all(&product, "kd/cc/total");
        let batch = b.batch_size(&image, "kd/cc/batch");
        let one = b.scalar("kd/cc/one", 1.0);
        let adjacent = b.sub(&batch, &one, "kd/cc/adjacent_pairs");
        let count = b.binary("Max", &adjacent, &one, "kd/cc/pair_count");
        Ok(Some(b.div(&total, &count, "kd/cc/term")))
    }
}
