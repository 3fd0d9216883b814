//! Reverse-mode differentiation of an ONNX graph into standard `ai.onnx` operators: given a graph,
//! a scalar output and a set of parameters, a graph that also outputs one gradient per parameter.
//!
//! The walk knows nothing of distillation. It marks the tensors that depend on a parameter
//! (active) and those the loss depends on (relevant), refuses any node between the two that has no
//! rule, then visits the nodes in reverse order and asks each rule (`rules/`) for the adjoints of
//! its inputs. Values that do not depend on a parameter carry no adjoint, so a frozen teacher gets
//! no backward pass at all. BatchNormalization on the trainable path runs in training mode
//! (`batchnorm.rs`) and outputs its new running statistics.

mod batchnorm;
mod context;
mod rules;

use std::collections::{HashMap, HashSet};

use crate::analysis::shapes::{infer_facts, Dim};
use crate::error::{Error, Result};
use crate::onnx::builder::GraphBuilder;
use crate::onnx::{edit, pb, proto};

use context::{Ctx, NodeView};

/// A gradient graph: the differentiated model and what its new outputs hold.
pub struct Gradients {
    pub model: pb::ModelProto,
    /// (parameter, the output that holds d loss / d parameter), in the order asked for.
    pub gradients: Vec<(String, String)>,
    /// (running statistic, the output that holds its updated value), one pair per BatchNorm
    /// statistic on the trainable path.
    pub state: Vec<(String, String)>,
}

/// Differentiates `loss` (a scalar output of `model`) with respect to `parameters` (float
/// initializers of `model`). `shown` names the model in messages.
pub fn differentiate(
    model: &pb::ModelProto,
    loss: &str,
    parameters: &[String],
    shown: &str,
) -> Result<Gradients> {
    let mut model = model.clone();
    let opset = proto::onnx_opset(&model);
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` holds no graph")))?;
    edit::topological_sort(graph)?;
    check_parameters(graph, loss, parameters, shown)?;
    let training = batchnorm::training_mode(graph, parameters, opset);
    let facts = infer_facts(&model, shown)?;
    let graph = model.graph.as_mut().expect("checked above");
    let plan = Walk::new(graph, loss, parameters, &facts, &training.batchnorms, shown)?;
    let mut ctx = Ctx::new(graph, &facts, opset);
    let adjoints = plan.run(graph, &mut ctx, loss, shown)?;
    let gradients = gradient_outputs(&mut ctx, graph, parameters, adjoints);
    ctx.finish(graph);
    for (param, grad) in &gradients {
        graph
            .output
            .push(float_output(grad, &param_dims(graph, param)));
    }
    for (statistic, next) in &training.state {
        graph
            .output
            .push(float_output(next, &param_dims(graph, statistic)));
    }
    Ok(Gradients {
        model,
        gradients,
        state: training.state,
    })
}

/// Every parameter is a float initializer and the loss is an output.
fn check_parameters(
    graph: &pb::GraphProto,
    loss: &str,
    parameters: &[String],
    shown: &str,
) -> Result<()> {
    if !graph.output.iter().any(|o| o.name == loss) {
        return Err(Error::invalid_model(format!(
            "`{shown}` has no output `{loss}` to differentiate"
        )));
    }
    let initializers = proto::initializers(graph);
    for name in parameters {
        match initializers.get(name.as_str()) {
            Some(t) if t.data_type == pb::tensor_proto::DataType::Float as i32 => {}
            Some(_) => {
                return Err(Error::unsupported(format!(
                    "`{shown}`: parameter `{name}` is not float32; only float32 parameters can be trained"
                )))
            }
            None => {
                return Err(Error::invalid_model(format!(
                    "`{shown}`: parameter `{name}` is not an initializer of the graph"
                )))
            }
        }
    }
    Ok(())
}

/// Which nodes the backward pass visits: those with an active input whose outputs the loss reads.
struct Walk<'a> {
    /// Tensors that depend on a parameter through differentiable operations.
    active: HashSet<String>,
    /// Indices of the nodes to visit, in forward order.
    visit: Vec<usize>,
    /// BatchNorms in training mode by their output: one closed-form rule for the whole
    /// decomposition, whose other nodes are not visited.
    batchnorms: HashMap<&'a str, &'a batchnorm::TrainingBatchNorm>,
}

impl<'a> Walk<'a> {
    fn new(
        graph: &pb::GraphProto,
        loss: &str,
        parameters: &[String],
        facts: &HashMap<String, crate::analysis::shapes::TensorFacts>,
        training: &'a [batchnorm::TrainingBatchNorm],
        shown: &str,
    ) -> Result<Walk<'a>> {
        let batchnorms: HashMap<&str, &batchnorm::TrainingBatchNorm> =
            training.iter().map(|bn| (bn.y.as_str(), bn)).collect();
        let members: HashSet<&str> = training
            .iter()
            .flat_map(|bn| bn.members.iter().map(String::as_str))
            .collect();
        let mut active: HashSet<String> = parameters.iter().cloned().collect();
        for node in &graph.node {
            if rules::stops_gradient(&node.op_type)
                || !node.input.iter().any(|i| active.contains(i))
            {
                continue;
            }
            let cast_to = (node.op_type == "Cast")
                .then(|| {
                    node.attribute
                        .iter()
                        .find(|a| a.name == "to")
                        .map(|a| a.i as i32)
                })
                .flatten();
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                let float = cast_to
                    .or_else(|| facts.get(output).and_then(|f| f.elem_type))
                    .is_none_or(is_float);
                if float {
                    active.insert(output.clone());
                }
            }
        }
        let relevant = edit::ancestors(graph, loss);
        let mut visit = Vec::new();
        let mut missing: Vec<&pb::NodeProto> = Vec::new();
        for (index, node) in graph.node.iter().enumerate() {
            let reaches_loss = node
                .output
                .iter()
                .any(|o| active.contains(o) && relevant.contains(o.as_str()));
            if !reaches_loss {
                continue;
            }
            let output = node.output.first().map(String::as_str).unwrap_or("");
            if batchnorms.contains_key(output) {
                visit.push(index);
                continue;
            }
            if node.output.iter().any(|o| members.contains(o.as_str())) {
                continue;
            }
            if rules::rule(&node.op_type).is_none() {
                missing.push(node);
            }
            visit.push(index);
        }
        if let Some(first) = missing.first() {
            let mut others: Vec<&str> = missing[1..].iter().map(|n| n.op_type.as_str()).collect();
            others.sort();
            others.dedup();
            let more = if missing.len() > 1 {
                format!(
                    " ({} more node(s) without a rule: {})",
                    missing.len() - 1,
                    others.join(", ")
                )
            } else {
                String::new()
            };
            return Err(Error::unsupported(format!(
                "`{shown}`: node `{}` ({}) lies between a trainable parameter and `{loss}`, and kdgraph has no gradient rule for {}{more}; export the model without it, or train this graph with ONNX Runtime Training",
                proto::node_label(first),
                first.op_type,
                first.op_type
            )));
        }
        Ok(Walk {
            active,
            visit,
            batchnorms,
        })
    }

    /// Visits the nodes in reverse order; returns the adjoint of every parameter reached.
    fn run(
        &self,
        graph: &pb::GraphProto,
        ctx: &mut Ctx,
        loss: &str,
        shown: &str,
    ) -> Result<HashMap<String, String>> {
        let mut pending: HashMap<String, Vec<String>> = HashMap::new();
        let seed = ctx.ones_like_scalar(loss)?;
        pending.insert(loss.to_string(), vec![seed]);
        for &index in self.visit.iter().rev() {
            let node = &graph.node[index];
            let output_adjoints: Vec<Option<String>> = node
                .output
                .iter()
                .map(|o| pending.remove(o).map(|parts| ctx.sum(parts, o)))
                .collect();
            if output_adjoints.iter().all(Option::is_none) {
                continue;
            }
            if let Some(bn) = self.batchnorms.get(node.output[0].as_str()) {
                let dy = output_adjoints[0]
                    .as_deref()
                    .expect("a BatchNorm's only output");
                let inputs = [&bn.x, &bn.scale, &bn.bias];
                let needs = inputs.map(|i| self.active.contains(i.as_str()));
                let adjoints = batchnorm::backward(&mut ctx.b, bn, dy, needs);
                for (input, adjoint) in inputs.into_iter().zip(adjoints) {
                    if let Some(adjoint) = adjoint {
                        pending.entry(input.clone()).or_default().push(adjoint);
                    }
                }
                continue;
            }
            let needs: Vec<bool> = node
                .input
                .iter()
                .map(|i| !i.is_empty() && self.active.contains(i))
                .collect();
            let rule = rules::rule(&node.op_type).expect("checked by Walk::new");
            let view = NodeView {
                node,
                needs: &needs,
            };
            let input_adjoints = rule(ctx, &view, &output_adjoints).map_err(|e| {
                Error::new(
                    e.kind,
                    format!(
                        "`{shown}`: cannot differentiate node `{}` ({}): {}",
                        proto::node_label(node),
                        node.op_type,
                        e.message()
                    ),
                )
            })?;
            for ((input, adjoint), need) in node.input.iter().zip(input_adjoints).zip(&needs) {
                if let (Some(adjoint), true) = (adjoint, need) {
                    pending.entry(input.clone()).or_default().push(adjoint);
                }
            }
        }
        Ok(pending
            .into_iter()
            .map(|(name, parts)| {
                let total = ctx.sum(parts, &name);
                (name, total)
            })
            .collect())
    }
}

/// One `<parameter>_grad` output per parameter; a parameter the loss does not read gets zeros.
fn gradient_outputs(
    ctx: &mut Ctx,
    graph: &pb::GraphProto,
    parameters: &[String],
    mut adjoints: HashMap<String, String>,
) -> Vec<(String, String)> {
    parameters
        .iter()
        .map(|param| {
            let name = ctx.b.unique(&format!("{param}_grad"));
            match adjoints.remove(param) {
                Some(adjoint) => ctx.b.node("Identity", &[&adjoint], &[&name], vec![], &name),
                None => {
                    let dims = param_dims(graph, param);
                    let shape =
                        ctx.b
                            .const_i64(&format!("{name}/shape"), &[dims.len() as i64], &dims);
                    let zero = ctx.b.scalar(&format!("{name}/zero"), 0.0);
                    ctx.b
                        .node("Expand", &[&zero, &shape], &[&name], vec![], &name);
                }
            }
            (param.clone(), name)
        })
        .collect()
}

fn param_dims(graph: &pb::GraphProto, name: &str) -> Vec<i64> {
    graph
        .initializer
        .iter()
        .find(|t| t.name == name)
        .map(|t| t.dims.clone())
        .unwrap_or_default()
}

/// A float32 graph output of fixed dims.
fn float_output(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    proto::tensor_info(
        name,
        pb::tensor_proto::DataType::Float,
        proto::fixed_dims(dims),
    )
}

fn is_float(elem_type: i32) -> bool {
    use pb::tensor_proto::DataType as T;
    [T::Float as i32, T::Double as i32, T::Float16 as i32].contains(&elem_type)
}

/// A fresh builder for nodes added to `graph`.
fn builder_for(graph: &pb::GraphProto, opset: i64) -> GraphBuilder {
    GraphBuilder::new(opset, proto::names_in(graph))
}

/// The dims of a shape when every one is fixed.
fn fixed_dims(shape: &[Dim]) -> Option<Vec<i64>> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbol(_) => None,
        })
        .collect()
}
