//! AB (activation boundaries): a margin loss on the signs of pre-ReLU maps; an init stage.

use super::connector::{chw, size_matching_conv};
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Ab;

impl Method for Ab {
    fn id(&self) -> &'static str {
        "ab"
    }

    fn taps(&self) -> TapKind {
        TapKind::StageEndsPreRelu
    }

    fn remark(&self) -> Option<&'static str> {
        Some("two stages: an init stage trains the student's feature layers and the connectors on the AB term; the main stage has CE (+ KD) only")
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 1.0 }
    }

    /// Identity when channels and size match, else conv + BN (FitNet's regressor without ReLU).
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        if chw(teacher)? == chw(student)? {
            return Ok(Vec::new());
        }
        let (t_c, _, _) = chw(teacher)?;
        let mut layers = size_matching_conv(teacher, student)?;
        layers.push(Layer::BatchNorm { channels: t_c });
        Ok(vec![Connector { name: "connector", side: Side::Student, layers }])
    }
}
