//! Running a joint graph with tract on seeded inputs and reading back every loss term.

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::pb;
use crate::plan::Role;

/// The largest input the check feeds (2^30 values, 4 GiB of float32).
const MAX_INPUT_ELEMENTS: usize = 1 << 30;

/// One scalar output of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Term {
    pub name: String,
    pub value: f32,
}

/// Runs `model` with tract at batch size `batch`: float inputs from a seeded generator, integer
/// inputs (labels, CRD's indices) `i % bound` with the bound their sidecar role records.
/// Returns every scalar float output (the loss and its terms), in output order.
pub fn run_losses(
    model: &pb::ModelProto,
    roles: &[Role],
    batch: usize,
    shown: &str,
) -> Result<Vec<Term>> {
    crate::guard::catch_panic(|| run(model, roles, batch, shown)).unwrap_or_else(|panic| {
        Err(Error::unsupported(format!(
            "tract failed while running `{shown}`: {panic}"
        )))
    })
}

fn run(model: &pb::ModelProto, roles: &[Role], batch: usize, shown: &str) -> Result<Vec<Term>> {
    let fail = |stage: &str, e: TractError| {
        Error::unsupported(format!(
            "tract could not {stage} `{shown}`: {}",
            e.chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ")
        ))
    };
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::invalid_model(format!("`{shown}` holds no graph")))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let feeds: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let mut inference = tract_onnx::onnx()
        .model_for_proto_model(
            crate::onnx::normalize::for_tract(model)
                .as_ref()
                .unwrap_or(model),
        )
        .map_err(|e| fail("read", e))?;
    let mut values = TVec::new();
    for (index, input) in feeds.iter().enumerate() {
        let (elem_type, dims) = input_type(input, batch)?;
        let elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if elements.is_none_or(|n| n > MAX_INPUT_ELEMENTS) {
            return Err(Error::unsupported(format!(
                "`{shown}`: input `{}` of shape {dims:?} is too large to check here; pass --no-check \
                 (merge) or a smaller --batch / --check-batch",
                input.name
            )));
        }
        let value = if elem_type == pb::tensor_proto::DataType::Int64 as i32 {
            let count: usize = dims.iter().product();
            let bound = roles
                .iter()
                .find(|r| r.name == input.name)
                .and_then(|r| r.index_bound)
                .filter(|&b| b > 0)
                .ok_or_else(|| {
                    Error::invalid_model(format!(
                        "`{shown}`: integer input `{}` has no index bound in the sidecar; run kdgraph merge again",
                        input.name
                    ))
                })?;
            tract_ndarray::ArrayD::from_shape_vec(
                dims.clone(),
                (0..count).map(|i| (i as i64) % bound).collect::<Vec<_>>(),
            )
            .map(|a| a.into_tensor())
            .map_err(|e| Error::invalid_model(format!("input `{}`: {e}", input.name)))?
        } else {
            let count: usize = dims.iter().product();
            let mut state = 0x2545_f491_4f6c_dd1du64 ^ (index as u64);
            let data: Vec<f32> = (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            tract_ndarray::ArrayD::from_shape_vec(dims.clone(), data)
                .map(|a| a.into_tensor())
                .map_err(|e| Error::invalid_model(format!("input `{}`: {e}", input.name)))?
        };
        let fact = InferenceFact::dt_shape(value.datum_type(), value.shape());
        inference
            .set_input_fact(index, fact)
            .map_err(|e| fail("set the inputs of", e))?;
        values.push(value.into_tvalue());
    }
    // Not decluttered: tract's decluttering can merge a teacher and a student that compute the
    // same tensors (one model merged with itself) into a node it then cannot evaluate.
    let runnable = inference
        .into_typed()
        .and_then(|m| m.into_runnable())
        .map_err(|e| fail("prepare", e))?;
    let outputs = runnable.run(values).map_err(|e| fail("run", e))?;
    let mut terms = Vec::new();
    for (info, value) in graph.output.iter().zip(outputs.iter()) {
        if value.rank() == 0 && value.datum_type() == f32::datum_type() {
            let v = value
                .cast_to_scalar::<f32>()
                .map_err(|e| fail("read the outputs of", e))?;
            terms.push(Term {
                name: info.name.clone(),
                value: v,
            });
        }
    }
    Ok(terms)
}

/// Element type and concrete dims of an input, with every symbolic dim set to `batch`.
fn input_type(input: &pb::ValueInfoProto, batch: usize) -> Result<(i32, Vec<usize>)> {
    let pb::type_proto::Value::TensorType(t) = input
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .ok_or_else(|| Error::invalid_model(format!("input `{}` has no type", input.name)))?;
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                        n as usize
                    }
                    _ => batch,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((t.elem_type, dims))
}
