//! GraphBuilder: appends nodes, constants and parameters to a graph under unique names, writing
//! each op in the form the target opset expects.

use std::collections::HashSet;

use super::pb::{self, tensor_proto::DataType};

/// A trainable parameter added by kdgraph, with whether it is a BN running statistic (frozen).
#[derive(Debug, Clone)]
pub struct Parameter {
    pub name: String,
    pub frozen: bool,
}

pub struct GraphBuilder {
    pub opset: i64,
    pub nodes: Vec<pb::NodeProto>,
    pub initializers: Vec<pb::TensorProto>,
    pub parameters: Vec<Parameter>,
    names: HashSet<String>,
}

/// An attribute value for [`GraphBuilder::op`].
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

impl GraphBuilder {
    /// A builder for a graph whose existing tensor names are `taken`.
    pub fn new(opset: i64, taken: impl IntoIterator<Item = String>) -> Self {
        GraphBuilder {
            opset,
            nodes: Vec::new(),
            initializers: Vec::new(),
            parameters: Vec::new(),
            names: taken.into_iter().collect(),
        }
    }

    /// `base`, or `base_1`, `base_2`, ... whichever is free.
    pub fn unique(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut n = 0;
        while self.names.contains(&name) {
            n += 1;
            name = format!("{base}_{n}");
        }
        self.names.insert(name.clone());
        name
    }

    /// Appends a node with one output named after `name` and returns that output.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        name: &str,
    ) -> String {
        let output = self.unique(name);
        self.node(op_type, inputs, &[&output], attrs, &output);
        output
    }

    /// Appends a node with the given outputs.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        name: &str,
    ) {
        let attribute = attrs
            .into_iter()
            .map(|(key, value)| {
                let mut a = pb::AttributeProto {
                    name: key.to_string(),
                    ..Default::default()
                };
                use pb::attribute_proto::AttributeType as T;
                match value {
                    Attr::Int(i) => {
                        a.i = i;
                        a.r#type = T::Int as i32;
                    }
                    Attr::Ints(v) => {
                        a.ints = v;
                        a.r#type = T::Ints as i32;
                    }
                    Attr::Float(f) => {
                        a.f = f;
                        a.r#type = T::Float as i32;
                    }
                }
                a
            })
            .collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute,
            ..Default::default()
        });
    }

    /// A constant float tensor (an initializer nobody trains).
    pub fn const_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        let name = self.unique(name);
        self.initializers.push(float_tensor(&name, dims, values));
        name
    }

    /// A constant float scalar.
    pub fn scalar(&mut self, name: &str, value: f32) -> String {
        self.const_f32(name, &[], &[value])
    }

    pub fn const_i64(&mut self, name: &str, dims: &[i64], values: &[i64]) -> String {
        let name = self.unique(name);
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: DataType::Int64 as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// A parameter initializer; `frozen` marks BN running statistics.
    pub fn parameter(
        &mut self,
        name: &str,
        dims: &[i64],
        values: &[f32],
        frozen: bool,
        doc: &str,
    ) -> String {
        let name = self.unique(name);
        let mut tensor = float_tensor(&name, dims, values);
        tensor.doc_string = doc.to_string();
        self.initializers.push(tensor);
        self.parameters.push(Parameter {
            name: name.clone(),
            frozen,
        });
        name
    }

    /// Documents the last node added (why it exists).
    pub fn doc_last(&mut self, doc: &str) {
        if let Some(node) = self.nodes.last_mut() {
            node.doc_string = doc.to_string();
        }
    }

    // Element-wise and matrix ops.

    /// A two-input op without attributes (Max, Min, Greater, And, ...).
    pub fn binary(&mut self, op_type: &str, a: &str, b: &str, name: &str) -> String {
        self.op(op_type, &[a, b], vec![], name)
    }

    pub fn add(&mut self, a: &str, b: &str, name: &str) -> String {
        self.op("Add", &[a, b], vec![], name)
    }
    pub fn sub(&mut self, a: &str, b: &str, name: &str) -> String {
        self.op("Sub", &[a, b], vec![], name)
    }
    pub fn mul(&mut self, a: &str, b: &str, name: &str) -> String {
        self.op("Mul", &[a, b], vec![], name)
    }
    pub fn div(&mut self, a: &str, b: &str, name: &str) -> String {
        self.op("Div", &[a, b], vec![], name)
    }
    pub fn matmul(&mut self, a: &str, b: &str, name: &str) -> String {
        self.op("MatMul", &[a, b], vec![], name)
    }
    pub fn unary(&mut self, op_type: &str, x: &str, name: &str) -> String {
        self.op(op_type, &[x], vec![], name)
    }
    pub fn square(&mut self, x: &str, name: &str) -> String {
        self.op("Mul", &[x, x], vec![], name)
    }
    pub fn transpose(&mut self, x: &str, perm: &[i64], name: &str) -> String {
        self.op(
            "Transpose",
            &[x],
            vec![("perm", Attr::Ints(perm.to_vec()))],
            name,
        )
    }

    /// Reshape to `dims` (0 copies the input's dim, -1 infers one).
    pub fn reshape(&mut self, x: &str, dims: &[i64], name: &str) -> String {
        let shape = self.const_i64(&format!("{name}.shape"), &[dims.len() as i64], dims);
        self.op("Reshape", &[x, &shape], vec![], name)
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64], name: &str) -> String {
        let axes = self.const_i64(&format!("{name}.axes"), &[axes.len() as i64], axes);
        self.op("Unsqueeze", &[x, &axes], vec![], name)
    }

    /// ReduceSum over `axes`, keeping them as size-1 dims (ORT's gradient of a reduction
    /// that drops axes fails on a symbolic batch).
    pub fn reduce_sum(&mut self, x: &str, axes: &[i64], name: &str) -> String {
        let axes = self.const_i64(&format!("{name}.axes"), &[axes.len() as i64], axes);
        self.op(
            "ReduceSum",
            &[x, &axes],
            vec![("keepdims", Attr::Int(1))],
            name,
        )
    }

    /// The sum of every element, as a scalar.
    pub fn sum_all(&mut self, x: &str, name: &str) -> String {
        self.op("ReduceSum", &[x], vec![("keepdims", Attr::Int(0))], name)
    }

    /// ReduceMean over `axes`, kept as size-1 dims; axes are an attribute before opset 18, an input from 18.
    pub fn reduce_mean(&mut self, x: &str, axes: &[i64], name: &str) -> String {
        let keep = ("keepdims", Attr::Int(1));
        if self.opset >= 18 {
            let axes = self.const_i64(&format!("{name}.axes"), &[axes.len() as i64], axes);
            return self.op("ReduceMean", &[x, &axes], vec![keep], name);
        }
        self.op(
            "ReduceMean",
            &[x],
            vec![keep, ("axes", Attr::Ints(axes.to_vec()))],
            name,
        )
    }

    /// The mean of every element, as a scalar.
    pub fn mean_all(&mut self, x: &str, name: &str) -> String {
        self.op("ReduceMean", &[x], vec![("keepdims", Attr::Int(0))], name)
    }

    /// Slice along one axis.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64, name: &str) -> String {
        let starts = self.const_i64(&format!("{name}.starts"), &[1], &[start]);
        let ends = self.const_i64(&format!("{name}.ends"), &[1], &[end]);
        let axes = self.const_i64(&format!("{name}.axes"), &[1], &[axis]);
        self.op("Slice", &[x, &starts, &ends, &axes], vec![], name)
    }
}

pub fn float_tensor(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}
