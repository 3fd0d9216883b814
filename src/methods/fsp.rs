//! FSP (flow of solution procedure): Gram matrices between consecutive spatial maps; an init stage.

use super::connector::chw;
use super::{Connector, Method, TapKind, Weights};
use crate::analysis::TensorInfo;
use crate::error::{Error, Result};

pub struct Fsp;

impl Method for Fsp {
    fn id(&self) -> &'static str {
        "fsp"
    }

    fn taps(&self) -> TapKind {
        TapKind::AllSpatial
    }

    fn remark(&self) -> Option<&'static str> {
        Some("two stages: an init stage trains the student's feature layers on the FSP term over consecutive pairs of spatial maps (the larger of each pair pooled); the main stage has CE only")
    }

    fn weights(&self) -> Weights {
        Weights { gamma: 1.0, alpha: 0.0, beta: 50.0 }
    }

    /// FSP compares Gram matrices position by position, so channel counts must agree.
    fn connectors(&self, teacher: &TensorInfo, student: &TensorInfo) -> Result<Vec<Connector>> {
        let (t_c, _, _) = chw(teacher)?;
        let (s_c, _, _) = chw(student)?;
        if t_c != s_c {
            return Err(Error::input(format!(
                "FSP needs equal channel counts at each position, but student `{}` has {s_c} and teacher `{}` has {t_c}; \
                 choose taps with matching channels with --tap, or another method",
                student.tensor, teacher.tensor
            )));
        }
        Ok(Vec::new())
    }
}
