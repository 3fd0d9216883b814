//! Every code path at once on one model, used as both teacher and student: decode, validate,
//! analyse, plan each method, assemble each stage. For the fuzz target and its regression tests.

use std::path::Path;

use crate::methods::{MethodName, Stage};
use crate::{analysis, joint, plan, prepare, PlanOptions};

/// Runs the whole pipeline on `bytes`; errors are expected and ignored, a panic is a bug.
pub fn exercise(bytes: &[u8]) {
    // A folder that holds no side files, so external data never resolves.
    let Ok(loaded) = crate::onnx::io::decode_model(bytes, Path::new("/nonexistent/fuzz.onnx"))
    else {
        return;
    };
    let Ok(prepared) = prepare(loaded, None) else {
        return;
    };
    let Ok(analysis) = analysis::analyse(&prepared.loaded.proto, "fuzz.onnx") else {
        return;
    };
    let files = joint::StageFiles {
        main: "joint.onnx".into(),
        init: Some("joint.init.onnx".into()),
    };
    for method in MethodName::ALL {
        let options = PlanOptions {
            methods: vec![method],
            taps: Vec::new(),
            gamma: None,
            alpha: None,
            betas: Vec::new(),
            temperature: 4.0,
            crd_n_data: Some(64),
            crd_negatives: 8,
            teacher_batch_statistics: false,
            input_shape: None,
        };
        let Ok(plan) = plan::plan(analysis.clone(), analysis.clone(), &options) else {
            continue;
        };
        for stage in [Stage::Init, Stage::Main] {
            let _ = joint::assemble(&prepared, &prepared, &plan, stage, &files);
        }
    }
}
