//! OFD (overhaul of feature distillation): partial L2 between connected student and margin-clipped
//! teacher pre-ReLU maps at every stage end.

use super::connector::{chw, conv};
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Ofd;

impl Method for Ofd {
    fn id(&self) -> &'static str {
        "ofd"
    }

    fn taps(&self) -> TapKind {
        TapKind::StageEndsPreRelu
    }

    fn remark(&self) -> Option<&'static str> {
        Some("the term is the stage-weighted sum (last stage weight 1, each earlier half) divided by the batch size, with teacher maps clipped at margins from the teacher's BatchNorm")
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 1.0 / 1000.0 }
    }

    fn pools(&self) -> bool {
        true
    }

    /// conv1x1 (no bias) + BN to the teacher's channels.
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let (t_c, _, _) = chw(teacher)?;
        let (s_c, _, _) = chw(student)?;
        let layers = vec![conv(s_c, t_c, 1, 1, false), Layer::BatchNorm { channels: t_c }];
        Ok(vec![Connector { name: "connector", side: Side::Student, layers }])
    }
}
