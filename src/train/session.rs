//! The step graph on tract: read and optimized once for a fixed batch, then run step after step
//! on a batch, the carried values, the learning rate and the step count, giving back the loss
//! terms and the carried values' next values.

use std::collections::HashMap;

use tract_onnx::prelude::*;

use super::crd::{Crd, CONTRAST_INDEX, INDEX};
use crate::error::{Error, Result};
use crate::onnx::{normalize, pb};
use crate::plan::Role;
use crate::sidecar::{TrainingSidecar, LABELS};
use crate::step::{Carried, LR, STEP};

/// One loss output of a step.
#[derive(Debug, Clone)]
pub struct Term {
    pub name: String,
    pub value: f32,
}

/// What a graph input of the step graph is fed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    Images,
    Labels,
    Carried(usize),
    Lr,
    Step,
    /// CRD's sample indices and contrast indices.
    Index,
    ContrastIndex,
}

/// What a step trains on: the images, their labels, their sample indices, and CRD's contrast
/// indices where the graph takes them.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub index: Tensor,
    pub contrast: Option<Tensor>,
}

/// The step graph, ready to run at one batch size.
pub struct StepSession {
    state: TypedSimpleState,
    feeds: Vec<Feed>,
    /// For each carried value (sidecar order), the position of its `_next` output.
    next_outputs: Vec<usize>,
    /// The loss and its terms: (output position, name).
    term_outputs: Vec<(usize, String)>,
    shown: String,
}

impl StepSession {
    /// Prepares the step graph `model` (shown as `shown`) of a stage for batches of `batch`
    /// images, of the size its sidecar's image input has; `carried`: what it reads and writes
    /// back (the step's carried values, then CRD's state); `crd`: CRD's sizes where it trains.
    pub fn open(
        model: &pb::ModelProto,
        sidecar: &TrainingSidecar,
        carried: &[Carried],
        crd: Option<&Crd>,
        batch: usize,
        shown: &str,
    ) -> Result<StepSession> {
        let feeds = feeds(model, carried, sidecar, shown)?;
        let graph = model.graph.as_ref().expect("a step graph has a graph");
        let position: HashMap<&str, usize> = graph
            .output
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), i))
            .collect();
        let next_outputs = carried
            .iter()
            .map(|c| {
                position.get(c.output.as_str()).copied().ok_or_else(|| {
                    Error::invalid_model(format!(
                        "`{shown}` has no output `{}` (the next value of `{}`); run kdgraph merge again",
                        c.output, c.input
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let term_outputs = sidecar
            .outputs
            .iter()
            .filter(|o| o.role == "loss" || o.role == "term")
            .filter_map(|o| position.get(o.name.as_str()).map(|&i| (i, o.name.clone())))
            .collect();
        let columns = crd.map_or(0, Crd::columns);
        if columns == 0 && feeds.contains(&Feed::ContrastIndex) {
            return Err(Error::invalid_model(format!(
                "`{shown}` takes `{CONTRAST_INDEX}`, but its sidecar lists no CRD memories; run kdgraph merge again"
            )));
        }
        let facts = input_facts(&feeds, sidecar, carried, columns, batch, shown)?;
        let state =
            crate::guard::catch_panic(|| prepare(model, facts, shown)).unwrap_or_else(|panic| {
                Err(Error::unsupported(format!(
                    "tract failed while preparing `{shown}`: {panic}"
                )))
            })?;
        Ok(StepSession {
            state,
            feeds,
            next_outputs,
            term_outputs,
            shown: shown.to_string(),
        })
    }

    /// One training step: returns the loss terms and the carried values after the update.
    pub fn step(
        &mut self,
        batch: Batch,
        carried: Vec<Tensor>,
        lr: f32,
        step: u64,
    ) -> Result<(Vec<Term>, Vec<Tensor>)> {
        let mut carried: Vec<Option<Tensor>> = carried.into_iter().map(Some).collect();
        let (mut images, mut labels) = (Some(batch.images), Some(batch.labels));
        let (mut index, mut contrast) = (Some(batch.index), batch.contrast);
        let inputs: TVec<TValue> = self
            .feeds
            .iter()
            .map(|feed| match *feed {
                Feed::Images => images.take().expect("one image input"),
                Feed::Labels => labels.take().expect("one labels input"),
                Feed::Carried(i) => carried[i].take().expect("each carried value fed once"),
                Feed::Lr => tensor0(lr),
                Feed::Step => tensor0(step as i64),
                Feed::Index => index.take().expect("one index input"),
                Feed::ContrastIndex => contrast.take().expect("contrast indices for CRD"),
            })
            .map(|t| t.into_tvalue())
            .collect();
        let state = &mut self.state;
        let outputs = crate::guard::catch_panic(|| state.run(inputs))
            .map_err(|panic| {
                Error::unsupported(format!(
                    "tract failed while running `{}`: {panic}",
                    self.shown
                ))
            })?
            .map_err(|e| {
                Error::unsupported(format!("tract could not run `{}`: {e:#}", self.shown))
            })?;
        let terms = self
            .term_outputs
            .iter()
            .map(|(i, name)| Term {
                name: name.clone(),
                value: outputs[*i].cast_to_scalar::<f32>().unwrap_or(f32::NAN),
            })
            .collect();
        let mut outputs: Vec<Option<TValue>> = outputs.into_iter().map(Some).collect();
        let next = self
            .next_outputs
            .iter()
            .map(|&i| {
                outputs[i]
                    .take()
                    .expect("each carried value has its own output")
                    .into_tensor()
            })
            .collect();
        Ok((terms, next))
    }
}

/// What each fed input of the step graph is; refuses inputs kdgraph train cannot feed.
fn feeds(
    model: &pb::ModelProto,
    carried: &[Carried],
    sidecar: &TrainingSidecar,
    shown: &str,
) -> Result<Vec<Feed>> {
    let image = image_role(sidecar, shown)?;
    crate::check::fed_inputs(model, shown)?
        .into_iter()
        .map(|input| {
            let name = input.name.as_str();
            if name == image.name {
                Ok(Feed::Images)
            } else if name == LABELS {
                Ok(Feed::Labels)
            } else if name == LR {
                Ok(Feed::Lr)
            } else if name == STEP {
                Ok(Feed::Step)
            } else if name == INDEX {
                Ok(Feed::Index)
            } else if name == CONTRAST_INDEX {
                Ok(Feed::ContrastIndex)
            } else if let Some(i) = carried.iter().position(|c| c.input == name) {
                Ok(Feed::Carried(i))
            } else {
                Err(Error::unsupported(format!(
                    "`{shown}` has an input `{name}` that kdgraph train does not know how to feed; \
                     train this graph with examples/train_ort.py"
                )))
            }
        })
        .collect()
}

/// The sidecar's image input.
pub fn image_role<'a>(sidecar: &'a TrainingSidecar, shown: &str) -> Result<&'a Role> {
    sidecar
        .inputs
        .iter()
        .find(|i| i.role == "image")
        .ok_or_else(|| {
            Error::invalid_model(format!(
                "the sidecar of `{shown}` lists no image input; run kdgraph merge again"
            ))
        })
}

/// The fixed shape and type of every fed input, in order.
fn input_facts(
    feeds: &[Feed],
    sidecar: &TrainingSidecar,
    carried: &[Carried],
    columns: usize,
    batch: usize,
    shown: &str,
) -> Result<Vec<InferenceFact>> {
    let image_dims = image_dims(image_role(sidecar, shown)?, shown)?;
    let mut images = vec![batch];
    images.extend(image_dims);
    Ok(feeds
        .iter()
        .map(|feed| match *feed {
            Feed::Images => InferenceFact::dt_shape(f32::datum_type(), images.clone()),
            Feed::Labels => InferenceFact::dt_shape(i64::datum_type(), vec![batch]),
            Feed::Carried(i) => InferenceFact::dt_shape(f32::datum_type(), dims_of(&carried[i])),
            Feed::Index => InferenceFact::dt_shape(i64::datum_type(), vec![batch]),
            Feed::ContrastIndex => InferenceFact::dt_shape(i64::datum_type(), vec![batch, columns]),
            Feed::Lr => InferenceFact::dt_shape(f32::datum_type(), Vec::<usize>::new()),
            Feed::Step => InferenceFact::dt_shape(i64::datum_type(), Vec::<usize>::new()),
        })
        .collect())
}

/// One image's fixed dims (C, H, W): the image input's shape without its batch.
pub fn image_dims(image: &Role, shown: &str) -> Result<Vec<usize>> {
    use crate::analysis::Dim;
    image
        .shape
        .iter()
        .skip(1)
        .map(|d| match d {
            Dim::Fixed(n) if *n > 0 => Ok(*n as usize),
            _ => Err(Error::unsupported(format!(
                "`{shown}`: image input `{}` has a size that is not fixed ({d}); merge with --input-shape C,H,W",
                image.name
            ))),
        })
        .collect()
}

pub fn dims_of(carried: &Carried) -> Vec<usize> {
    carried.dims.iter().map(|&d| d.max(0) as usize).collect()
}

/// The step graph typed for `facts`, optimized, and ready to run.
fn prepare(
    model: &pb::ModelProto,
    facts: Vec<InferenceFact>,
    shown: &str,
) -> Result<TypedSimpleState> {
    let fail = |stage: &str, e: TractError| {
        Error::unsupported(format!("tract could not {stage} `{shown}`: {e:#}"))
    };
    let mut inference = tract_onnx::onnx()
        .model_for_proto_model(normalize::for_tract(model).as_ref().unwrap_or(model))
        .map_err(|e| fail("read", e))?;
    for (index, fact) in facts.into_iter().enumerate() {
        inference
            .set_input_fact(index, fact)
            .map_err(|e| fail("set the inputs of", e))?;
    }
    let plan = inference
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| fail("prepare", e))?;
    plan.spawn().map_err(|e| fail("prepare", e))
}
