//! NST (neuron selectivity transfer): polynomial-kernel MMD between channel activations of stage ends.

use super::{Method, TapKind, Weights};

pub struct Nst;

impl Method for Nst {
    fn id(&self) -> &'static str {
        "nst"
    }

    fn taps(&self) -> TapKind {
        TapKind::StageEnds
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 50.0 }
    }

    fn pools(&self) -> bool {
        true
    }
}
