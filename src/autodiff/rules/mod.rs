//! The gradient rules, one small function per operator, grouped by family; each family file
//! lists its rules in a `RULES` table of (op type, rule).
//!
//! A rule gets the node (with which inputs need an adjoint) and the adjoints of its outputs
//! (None where the loss does not read an output) and returns one adjoint per input (None where
//! the input needs none). It adds its nodes through the context, in standard `ai.onnx` operators.

mod conv;
mod elementwise;
mod linear;
mod pool;
mod reduce;
mod shape;
mod softmax;

use super::context::{Ctx, NodeView};
use crate::error::Result;

pub type Rule = fn(&mut Ctx, &NodeView, &[Option<String>]) -> Result<Vec<Option<String>>>;

const FAMILIES: &[&[(&str, Rule)]] = &[
    elementwise::RULES,
    reduce::RULES,
    softmax::RULES,
    shape::RULES,
    linear::RULES,
    conv::RULES,
    pool::RULES,
];

/// Operators whose outputs carry no gradient: shapes, comparisons, indices, rounding, random draws.
const STOPS: &[&str] = &[
    "Shape",
    "Size",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Not",
    "And",
    "Or",
    "Xor",
    "ArgMax",
    "ArgMin",
    "NonZero",
    "IsNaN",
    "IsInf",
    "Sign",
    "Floor",
    "Ceil",
    "Round",
    "ConstantOfShape",
    "EyeLike",
    "RandomUniformLike",
    "RandomNormalLike",
    "RandomUniform",
    "RandomNormal",
    "Bernoulli",
    "Range",
    "Constant",
];

/// The rule for `op_type`, if kdgraph has one.
pub fn rule(op_type: &str) -> Option<Rule> {
    FAMILIES
        .iter()
        .flat_map(|family| family.iter())
        .find(|(op, _)| *op == op_type)
        .map(|(_, rule)| *rule)
}

/// Whether `op_type`'s outputs never carry a gradient, whatever its inputs.
pub fn stops_gradient(op_type: &str) -> bool {
    STOPS.contains(&op_type)
}
