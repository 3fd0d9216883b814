//! VID (variational information distillation): a Gaussian likelihood of the teacher map under a
//! regressed mean and a learned per-channel variance.

use super::connector::{chw, conv};
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Vid;

impl Method for Vid {
    fn id(&self) -> &'static str {
        "vid"
    }

    fn taps(&self) -> TapKind {
        TapKind::StageEnds
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 1.0 }
    }

    fn pools(&self) -> bool {
        true
    }

    /// conv1x1 s_C->t_C, ReLU, conv1x1, ReLU, conv1x1 (no bias); the log-scale is the method's own.
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let (t_c, _, _) = chw(teacher)?;
        let (s_c, _, _) = chw(student)?;
        let layers = vec![
            conv(s_c, t_c, 1, 1, false),
            Layer::Relu,
            conv(t_c, t_c, 1, 1, false),
            Layer::Relu,
            conv(t_c, t_c, 1, 1, false),
        ];
        Ok(vec![Connector { name: "regressor", side: Side::Student, layers }])
    }
}
