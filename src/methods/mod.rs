//! The fourteen distillation methods of METHODS.md: one file each, one trait, one registry.
//!
//! A method says which taps it reads, its default loss weights and the connectors it inserts;
//! everything else (pairing, reporting) is shared.

mod ab;
mod at;
mod cc;
pub mod crd;
mod fitnet;
mod fsp;
mod ft;
mod kd;
mod nst;
mod ofd;
mod pkt;
mod rkd;
mod sp;
mod vid;

pub mod connector;
pub mod context;
mod init;

use std::fmt;

use serde::Serialize;

use crate::analysis::TensorInfo;
use crate::error::Result;
use crate::plan::TapPair;
pub use connector::{Connector, ConvInit, Layer, Side};
pub use context::{LossContext, Stage, TEACHER_PREFIX};

/// The method names a user types, lower case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    Kd,
    Fitnet,
    At,
    Sp,
    Cc,
    Vid,
    Rkd,
    Pkt,
    Ab,
    Ft,
    Fsp,
    Nst,
    Crd,
    Ofd,
}

impl MethodName {
    pub const ALL: [MethodName; 14] = [
        MethodName::Kd,
        MethodName::Fitnet,
        MethodName::At,
        MethodName::Sp,
        MethodName::Cc,
        MethodName::Vid,
        MethodName::Rkd,
        MethodName::Pkt,
        MethodName::Ab,
        MethodName::Ft,
        MethodName::Fsp,
        MethodName::Nst,
        MethodName::Crd,
        MethodName::Ofd,
    ];

    pub fn as_str(self) -> &'static str {
        registry(self).id()
    }
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which tensors of each model a method reads (METHODS.md, "Taps").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapKind {
    /// The logits.
    Logits,
    /// One spatial map by RepDistiller position (`feat[i]`, 0 = stem).
    Hint(usize),
    /// Stage ends `feat[1:-1]`, post-ReLU.
    StageEnds,
    /// Stage ends before their final ReLU.
    StageEndsPreRelu,
    /// The last spatial map `feat[-2]`.
    LastSpatial,
    /// Every spatial map `feat[:-1]`, stem included (consecutive pairs are compared).
    AllSpatial,
    /// The penultimate embedding `feat[-1]`.
    Embedding,
}

/// The weights of the total loss `gamma * CE + alpha * KD + beta * L_method`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub gamma: f64,
    pub alpha: f64,
    pub beta: f64,
}

/// Everything kdgraph knows about one method.
pub trait Method: Sync {
    fn id(&self) -> &'static str;
    fn taps(&self) -> TapKind;
    /// Defaults of the RepDistiller scripts (student resnet8x4), METHODS.md "Total loss".
    fn weights(&self) -> Weights;
    /// Whether the larger of two spatial maps is average-pooled to the smaller before comparing.
    fn pools(&self) -> bool {
        false
    }
    /// Whether pooling comes before the connector (VID) rather than after it.
    fn pool_before_connector(&self) -> bool {
        false
    }
    /// Whether the method trains in an init stage before the main one (AB, FSP, FT).
    fn has_init_stage(&self) -> bool {
        false
    }
    /// Connectors trained in the init stage and fixed in the main one.
    fn frozen_in_main(&self) -> &'static [&'static str] {
        &[]
    }
    /// How the method departs from "one graph, one loss" (stages, scaling), for the report.
    fn remark(&self) -> Option<&'static str> {
        None
    }
    /// The trainable parts inserted for one pair.
    fn connectors(&self, _teacher: &TensorInfo, _student: &TensorInfo) -> Result<Vec<Connector>> {
        Ok(Vec::new())
    }
    /// Adds the method's unweighted loss term (METHODS.md) for `ctx.stage` over its pairs and
    /// returns the scalar tensor, or None where that stage has no term of this method.
    fn build(&self, ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>>;
}

/// The method of a name.
pub fn registry(name: MethodName) -> &'static dyn Method {
    match name {
        MethodName::Kd => &kd::Kd,
        MethodName::Fitnet => &fitnet::FitNet,
        MethodName::At => &at::At,
        MethodName::Sp => &sp::Sp,
        MethodName::Cc => &cc::Cc,
        MethodName::Vid => &vid::Vid,
        MethodName::Rkd => &rkd::Rkd,
        MethodName::Pkt => &pkt::Pkt,
        MethodName::Ab => &ab::Ab,
        MethodName::Ft => &ft::Ft,
        MethodName::Fsp => &fsp::Fsp,
        MethodName::Nst => &nst::Nst,
        MethodName::Crd => &crd::Crd,
        MethodName::Ofd => &ofd::Ofd,
    }
}
