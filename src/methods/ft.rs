//! FT (factor transfer, RepDistiller form): a paraphraser trained on the teacher's last map in an
//! init stage, a translator on the student's; L1 between normalised factors.

use super::connector::{chw, conv};
use super::{Connector, Layer, Method, Side, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::Result;

pub struct Ft;

const SLOPE: f64 = 0.1;

impl Method for Ft {
    fn id(&self) -> &'static str {
        "ft"
    }

    fn taps(&self) -> TapKind {
        TapKind::LastSpatial
    }

    fn remark(&self) -> Option<&'static str> {
        Some("two stages: an init stage trains the paraphraser (with a decoder) to reconstruct the teacher map; the main stage freezes it and trains the translator")
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 200.0 }
    }

    fn pools(&self) -> bool {
        true
    }

    /// The paraphraser's encoder (teacher side; its decoder exists in the init stage only) and
    /// the translator (student side).
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let (t_c, _, _) = chw(teacher)?;
        let (s_c, _, _) = chw(student)?;
        let leaky = || Layer::LeakyRelu { slope: SLOPE };
        let factor = t_c / 2;
        let encoder = vec![
            conv(t_c, t_c, 3, 1, true),
            leaky(),
            conv(t_c, factor, 3, 1, true),
            leaky(),
            conv(factor, factor, 3, 1, true),
            leaky(),
        ];
        let translator = vec![
            conv(s_c, s_c, 3, 1, true),
            Layer::BatchNorm { channels: s_c },
            leaky(),
            conv(s_c, factor, 3, 1, true),
            Layer::BatchNorm { channels: factor },
            leaky(),
            conv(factor, factor, 3, 1, true),
            Layer::BatchNorm { channels: factor },
            leaky(),
        ];
        Ok(vec![
            Connector { name: "paraphraser", side: Side::Teacher, layers: encoder },
            Connector { name: "translator", side: Side::Student, layers: translator },
        ])
    }
}
