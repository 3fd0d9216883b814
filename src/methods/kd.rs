//! KD (Hinton et al.): KL divergence between temperature-softened teacher and student logits.

use super::{Method, TapKind, Weights};

pub struct Kd;

impl Method for Kd {
    fn id(&self) -> &'static str {
        "kd"
    }

    fn taps(&self) -> TapKind {
        TapKind::Logits
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 0.1, alpha: 0.9, beta: 0.0 }
    }
}
