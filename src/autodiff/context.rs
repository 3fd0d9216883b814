//! What a gradient rule sees: the node being differentiated (`NodeView`) and a context (`Ctx`) that
//! adds nodes and answers questions about tensors (shapes, element types, constant values).

use std::collections::HashMap;

use crate::analysis::shapes::{Dim, Shape, TensorFacts};
use crate::error::{Error, Result};
use crate::onnx::builder::{Attr, GraphBuilder};
use crate::onnx::{pb, proto};

/// One node of the forward graph and which of its inputs need an adjoint.
pub struct NodeView<'a> {
    pub node: &'a pb::NodeProto,
    pub needs: &'a [bool],
}

impl NodeView<'_> {
    /// Input `i`'s name ("" when absent).
    pub fn input(&self, i: usize) -> &str {
        self.node.input.get(i).map(String::as_str).unwrap_or("")
    }

    /// Whether input `i` is present and optional-free.
    pub fn has_input(&self, i: usize) -> bool {
        !self.input(i).is_empty()
    }

    pub fn output(&self, i: usize) -> &str {
        self.node.output.get(i).map(String::as_str).unwrap_or("")
    }

    /// Whether input `i` needs an adjoint (it depends on a parameter).
    pub fn needs(&self, i: usize) -> bool {
        self.needs.get(i).copied().unwrap_or(false)
    }

    fn attribute(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.attribute(name).map(|a| a.i).unwrap_or(default)
    }

    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        self.attribute(name).map(|a| a.f).unwrap_or(default)
    }

    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attribute(name).map(|a| a.ints.clone())
    }

    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attribute(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }

    /// A name for nodes added for this node's backward pass: `grad/<first output>/<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("grad/{}/{what}", self.output(0))
    }
}

/// The adjoint of a node's first output; an error when the loss reads only its other outputs.
pub fn first_adjoint(dy: &[Option<String>]) -> Result<&str> {
    dy.first().and_then(Option::as_deref).ok_or_else(|| {
        Error::unsupported("the loss reads only its secondary outputs, which carry no gradient")
    })
}

/// The context of the backward pass: the builder of added nodes and facts about forward tensors.
pub struct Ctx<'a> {
    pub b: GraphBuilder,
    facts: &'a HashMap<String, TensorFacts>,
    constants: HashMap<String, pb::TensorProto>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        graph: &pb::GraphProto,
        facts: &'a HashMap<String, TensorFacts>,
        opset: i64,
    ) -> Self {
        let mut constants: HashMap<String, pb::TensorProto> = graph
            .initializer
            .iter()
            .filter(|t| {
                use pb::tensor_proto::DataType as T;
                t.data_type == T::Int64 as i32 || t.data_type == T::Bool as i32
            })
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
            if let (Some(output), Some(value)) = (
                node.output.first(),
                node.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.clone()),
            ) {
                constants.insert(output.clone(), value);
            }
        }
        Ctx {
            b: super::builder_for(graph, opset),
            facts,
            constants,
        }
    }

    pub fn opset(&self) -> i64 {
        self.b.opset
    }

    /// The shape of a forward tensor (batch dims symbolic).
    pub fn shape(&self, tensor: &str) -> Result<&Shape> {
        self.facts
            .get(tensor)
            .and_then(|f| f.shape.as_ref())
            .ok_or_else(|| {
                Error::unsupported(format!(
                    "the shape of `{tensor}` is unknown; give the model fixed input shapes"
                ))
            })
    }

    pub fn rank(&self, tensor: &str) -> Result<usize> {
        Ok(self.shape(tensor)?.len())
    }

    /// The dims of `tensor` when all are fixed.
    pub fn fixed_dims(&self, tensor: &str) -> Result<Vec<i64>> {
        super::fixed_dims(self.shape(tensor)?).ok_or_else(|| {
            Error::unsupported(format!(
                "the shape of `{tensor}` must be fixed here; give the model fixed input shapes"
            ))
        })
    }

    /// The ONNX element type of a forward tensor, if known.
    pub fn elem_type(&self, tensor: &str) -> Option<i32> {
        self.facts.get(tensor).and_then(|f| f.elem_type)
    }

    /// A float mask (`[x = y]`, ...) in the element type of the float tensor `like`: a Cast of
    /// the bool `mask` (to float32 where the type of `like` is unknown).
    pub fn float_mask(&mut self, mask: &str, like: &str, name: &str) -> String {
        let to = self
            .elem_type(like)
            .unwrap_or(pb::tensor_proto::DataType::Float as i32);
        self.b
            .op("Cast", &[mask], vec![("to", Attr::Int(to as i64))], name)
    }

    /// The values of an int64 constant (initializer or Constant node), if `tensor` is one.
    /// Where `tensor` is computed from constants (torch.export's unoptimised graphs), the values
    /// tract's inference found.
    pub fn const_ints(&self, tensor: &str) -> Option<Vec<i64>> {
        match self.constants.get(tensor) {
            Some(t) => proto::int_values(t),
            None => self.facts.get(tensor).and_then(|f| f.ints.clone()),
        }
    }

    /// The values of a bool constant (initializer or Constant node), if `tensor` is one.
    pub fn const_bools(&self, tensor: &str) -> Option<Vec<bool>> {
        let t = self.constants.get(tensor)?;
        if t.data_type != pb::tensor_proto::DataType::Bool as i32 {
            return None;
        }
        if !t.raw_data.is_empty() {
            Some(t.raw_data.iter().map(|&b| b != 0).collect())
        } else {
            Some(t.int32_data.iter().map(|&b| b != 0).collect())
        }
    }

    /// The sum of the adjoint contributions `parts` to `tensor`.
    pub fn sum(&mut self, parts: Vec<String>, tensor: &str) -> String {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let inputs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.b
            .op("Sum", &inputs, vec![], &format!("grad/{tensor}/sum"))
    }

    /// The seed adjoint of the loss: ones of the loss's shape (a scalar, or all-1 dims).
    pub fn ones_like_scalar(&mut self, loss: &str) -> Result<String> {
        let dims = self.fixed_dims(loss)?;
        if dims.iter().any(|&d| d != 1) {
            return Err(Error::unsupported(format!(
                "the loss `{loss}` has shape {dims:?}; differentiate a scalar"
            )));
        }
        Ok(self
            .b
            .const_f32(&format!("grad/{loss}/seed"), &dims, &[1.0]))
    }

    /// Reduces `grad` (shaped like the output of a broadcasting op) to the shape of `input`:
    /// sums over the axes broadcasting added or stretched, then reshapes to the input's shape.
    pub fn unbroadcast(&mut self, grad: &str, input: &str, output: &str) -> Result<String> {
        let in_shape = self.shape(input)?.clone();
        let out_shape = self.shape(output)?.clone();
        if in_shape == out_shape {
            return Ok(grad.to_string());
        }
        let lead = out_shape.len().saturating_sub(in_shape.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        for (i, dim) in in_shape.iter().enumerate() {
            let out = &out_shape[lead + i];
            if *dim == Dim::Fixed(1) && *out != Dim::Fixed(1) {
                axes.push((lead + i) as i64);
            }
        }
        let name = format!("grad/{input}/unbroadcast");
        let summed = if axes.is_empty() {
            grad.to_string()
        } else {
            self.b.reduce_sum(grad, &axes, &name)
        };
        if lead == 0 {
            return Ok(summed);
        }
        match super::fixed_dims(&in_shape) {
            Some(dims) => Ok(self.b.reshape(&summed, &dims, &format!("{name}/reshape"))),
            None => {
                let shape = self.b.unary("Shape", input, &format!("{name}/shape"));
                Ok(self.b.op(
                    "Reshape",
                    &[&summed, &shape],
                    vec![],
                    &format!("{name}/reshape"),
                ))
            }
        }
    }

    /// A node with one output and the given attributes (shorthand for rules).
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        name: &str,
    ) -> String {
        self.b.op(op_type, inputs, attrs, name)
    }

    /// A node like [`Ctx::op`] that also carries string attributes (a scatter's `reduction`).
    pub fn op_with_strings(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        strings: &[(&str, &str)],
        name: &str,
    ) -> String {
        let output = self.b.op(op_type, inputs, attrs, name);
        let node = self.b.nodes.last_mut().expect("a node was just added");
        for (key, value) in strings {
            node.attribute.push(pb::AttributeProto {
                name: key.to_string(),
                s: value.as_bytes().to_vec(),
                r#type: pb::attribute_proto::AttributeType::String as i32,
                ..Default::default()
            });
        }
        output
    }

    /// Moves the added nodes and constants into `graph`, after its forward nodes.
    pub fn finish(&mut self, graph: &mut pb::GraphProto) {
        graph.node.append(&mut self.b.nodes);
        graph.initializer.append(&mut self.b.initializers);
    }
}
