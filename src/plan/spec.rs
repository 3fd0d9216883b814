//! What a method declares about itself (taps, weights, options, stages, connectors) as a plain
//! value: the planner, the report and the command line read it; each method file holds one.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Serialize, Serializer};

use super::connector::Connector;
use crate::analysis::TensorInfo;
use crate::error::Result;

/// Which tensors of each model a method reads.
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

/// The init stage of a method that trains one before the main stage (AB, FSP, FT).
#[derive(Debug, Clone, Copy)]
pub struct InitStage {
    /// The reference's number of epochs for the init stage.
    pub epochs: u32,
    /// Connectors trained in the init stage and fixed (constants) in the main one.
    pub frozen_in_main: &'static [&'static str],
}

/// A value of a method option.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionValue {
    Int(i64),
    Float(f64),
    /// A switch: given or not.
    Flag(bool),
}

/// What a method option holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKind {
    Int,
    Float,
    /// A switch that takes no value (`--fsp-connectors`).
    Flag,
}

impl OptionValue {
    pub fn as_f64(self) -> f64 {
        match self {
            OptionValue::Int(i) => i as f64,
            OptionValue::Float(f) => f,
            OptionValue::Flag(b) => b as i64 as f64,
        }
    }

    /// The integer value (options declared as integers always hold one).
    pub fn as_i64(self) -> i64 {
        match self {
            OptionValue::Int(i) => i,
            OptionValue::Float(f) => f as i64,
            OptionValue::Flag(b) => b as i64,
        }
    }
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Int(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Flag(b) => write!(f, "{b}"),
        }
    }
}

impl Serialize for OptionValue {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            OptionValue::Int(i) => s.serialize_i64(*i),
            OptionValue::Float(f) => s.serialize_f64(*f),
            OptionValue::Flag(b) => s.serialize_bool(*b),
        }
    }
}

/// One option of a method: the flag `--<flag>` on the command line, `<key>` in the sidecar's
/// hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub flag: &'static str,
    pub key: &'static str,
    pub value_name: &'static str,
    pub help: &'static str,
    /// None: the user must give it before a graph can be written.
    pub default: Option<OptionValue>,
    pub kind: OptionKind,
    /// The accepted range, both ends included.
    pub min: f64,
    pub max: f64,
}

/// The option values of one method, in the order its spec declares them.
pub type OptionValues = Vec<(&'static str, OptionValue)>;

/// The value of option `key` among a method's values.
pub fn option_value(values: &OptionValues, key: &str) -> Option<OptionValue> {
    values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// The connectors a method inserts for one (teacher, student) pair.
pub type ConnectorsFn = fn(&TensorInfo, &TensorInfo, &OptionValues) -> Result<Vec<Connector>>;

/// Everything kdgraph knows about a method besides how to build its loss.
#[derive(Debug)]
pub struct MethodSpec {
    /// The name a user types, lower case.
    pub id: &'static str,
    pub taps: TapKind,
    /// Defaults of the RepDistiller scripts (student resnet8x4).
    pub weights: Weights,
    /// Whether the larger of two spatial maps is average-pooled to the smaller before comparing.
    pub pools: bool,
    /// Whether pooling comes before the connector (VID) rather than after it.
    pub pool_before_connector: bool,
    pub init_stage: Option<InitStage>,
    /// How the method departs from "one graph, one loss" (stages, scaling), for the report.
    pub remark: Option<&'static str>,
    pub options: &'static [OptionSpec],
    /// Cross-option checks beyond each option's range, and defaults that depend on other
    /// options: takes the values and the keys the user gave; returns notes for the report.
    pub settle_options: Option<fn(&mut OptionValues, &[&str]) -> Result<Vec<String>>>,
    pub connectors: ConnectorsFn,
    /// What the report should say about the method's pairs (e.g. where OFD's margins come
    /// from): (notes, warnings).
    pub review_pairs: Option<fn(&[&super::TapPair]) -> (Vec<String>, Vec<String>)>,
}

/// The defaults of a method without connectors, options or remarks; specs spread it.
pub const SPEC_DEFAULTS: MethodSpec = MethodSpec {
    id: "",
    taps: TapKind::Logits,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 1.0,
    },
    pools: false,
    pool_before_connector: false,
    init_stage: None,
    remark: None,
    options: &[],
    settle_options: None,
    connectors: no_connectors,
    review_pairs: None,
};

fn no_connectors(_: &TensorInfo, _: &TensorInfo, _: &OptionValues) -> Result<Vec<Connector>> {
    Ok(Vec::new())
}

/// A chosen method: a handle on its spec, compared, ordered and shown by its id.
#[derive(Debug, Clone, Copy)]
pub struct MethodName(pub &'static MethodSpec);

impl MethodName {
    pub fn as_str(self) -> &'static str {
        self.0.id
    }

    pub fn spec(self) -> &'static MethodSpec {
        self.0
    }

    /// KD, whose term is weighted by alpha and reads the logits.
    pub fn is_kd(self) -> bool {
        self.0.id == KD
    }
}

/// The id of Hinton's KD, the method `--alpha` weighs.
pub const KD: &str = "kd";

impl PartialEq for MethodName {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for MethodName {}

impl Hash for MethodName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state)
    }
}

impl PartialOrd for MethodName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MethodName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.id.cmp(other.0.id)
    }
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.id)
    }
}

impl Serialize for MethodName {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.id)
    }
}
