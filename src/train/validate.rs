//! Validation accuracy: the exported student run with tract on a held-out data set, in batches of
//! the training batch size (the last one padded with zero images, whose predictions are ignored).

use tract_onnx::prelude::*;

use super::data::DataSet;
use crate::error::{Error, Result};
use crate::onnx::pb;

/// The share of `data` whose label is the student's top logit.
pub fn accuracy(
    student: &pb::ModelProto,
    data: &DataSet,
    image_dims: &[usize],
    batch: usize,
) -> Result<f64> {
    let fail = |stage: &str, e: TractError| {
        Error::unsupported(format!(
            "tract could not {stage} the exported student: {e:#}"
        ))
    };
    let mut shape = vec![batch];
    shape.extend_from_slice(image_dims);
    let plan = tract_onnx::onnx()
        .model_for_proto_model(student)
        .and_then(|m| m.with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape)))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| fail("prepare", e))?;
    let mut correct = 0usize;
    let mut start = 0;
    while start < data.len() {
        let count = batch.min(data.len() - start);
        let images = data.padded_images(start, count, batch);
        let outputs = plan
            .run(tvec![images.into_tvalue()])
            .map_err(|e| fail("run", e))?;
        let logits = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| fail("read the logits of", e))?;
        for row in 0..count {
            let predicted = logits
                .index_axis(tract_ndarray::Axis(0), row)
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0;
            correct += usize::from(predicted as i64 == data.label(start + row));
        }
        start += count;
    }
    Ok(correct as f64 / data.len() as f64)
}
