//! CRD (contrastive representation distillation): NCE over memory banks of embeddings, with the
//! banks and the normalisers as state that the graph reads and writes back.

use super::LossContext;
use crate::analysis::{Dim, TensorInfo};
use crate::error::{Error, Result};
use crate::onnx::builder::{Attr, GraphBuilder};
use crate::plan::connector::{embeddings_on_both_sides, feat_dim_option};
use crate::plan::{
    option_value, Connector, Layer, MethodSpec, OptionKind, OptionSpec, OptionValue, OptionValues,
    Role, Side, TapKind, TapPair, Weights, SPEC_DEFAULTS,
};

/// The most training samples the memory banks are built for (2^24: 2 x 8 GiB of float32).
const MAX_SAMPLES: f64 = (1u64 << 24) as f64;
const EPS: f32 = 1e-7;

/// RepDistiller's `n_data` (no default: the training set's size), `nce_k`, `feat_dim`, `nce_t`, `nce_m`.
static OPTIONS: [OptionSpec; 5] = [
    OptionSpec {
        flag: "crd-n-data",
        key: "n_data",
        value_name: "N",
        help: "the number of samples in the training set (the size of its memory banks)",
        default: None,
        kind: OptionKind::Int,
        min: 2.0,
        max: MAX_SAMPLES,
    },
    OptionSpec {
        flag: "crd-negatives",
        key: "negatives",
        value_name: "K",
        help: "negatives per sample, drawn from other samples",
        default: Some(OptionValue::Int(16384)),
        kind: OptionKind::Int,
        min: 1.0,
        max: MAX_SAMPLES,
    },
    feat_dim_option("crd-feat-dim"),
    OptionSpec {
        flag: "crd-temperature",
        key: "temperature",
        value_name: "TAU",
        help: "the temperature of the contrastive scores",
        default: Some(OptionValue::Float(0.07)),
        kind: OptionKind::Float,
        min: 1e-6,
        max: 1e6,
    },
    OptionSpec {
        flag: "crd-momentum",
        key: "momentum",
        value_name: "M",
        help: "the momentum of the memory-bank updates",
        default: Some(OptionValue::Float(0.5)),
        kind: OptionKind::Float,
        min: 0.0,
        max: 1.0,
    },
];

/// Negatives are other samples: fewer than the training set has. Without --crd-negatives, the
/// reference's 16384 shrinks to what the training set holds (N - 1), and the report says so.
fn settle_options(values: &mut OptionValues, given: &[&str]) -> Result<Vec<String>> {
    let get = |values: &OptionValues, key: &str| option_value(values, key).map(|v| v.as_i64());
    let (Some(n_data), Some(negatives)) = (get(values, "n_data"), get(values, "negatives")) else {
        return Ok(Vec::new());
    };
    if negatives < n_data {
        return Ok(Vec::new());
    }
    if given.contains(&"negatives") {
        return Err(Error::usage(format!(
            "--crd-negatives {negatives} must be at least 1 and smaller than --crd-n-data {n_data} (negatives are other samples)"
        )));
    }
    for (key, value) in values.iter_mut() {
        if *key == "negatives" {
            *value = OptionValue::Int(n_data - 1);
        }
    }
    Ok(vec![format!(
        "crd: --crd-negatives defaults to {} here, the other samples of --crd-n-data {n_data} (the reference's {negatives} needs a larger training set)",
        n_data - 1
    )])
}

pub const INDEX: &str = "kd/crd/index";
pub const CONTRAST_INDEX: &str = "kd/crd/contrast_index";
pub const MEMORY_STUDENT: &str = "kd/crd/memory_student";
pub const MEMORY_TEACHER: &str = "kd/crd/memory_teacher";
pub const Z: &str = "kd/crd/z";

pub static SPEC: MethodSpec = MethodSpec {
    id: "crd",
    taps: TapKind::Embedding,
    weights: Weights {
        gamma: 1.0,
        alpha: 0.0,
        beta: 0.8,
    },
    remark: Some("needs the data loader's sample indices and contrast indices, and carries two memory banks as state inputs and outputs"),
    options: &OPTIONS,
    settle_options: Some(settle_options),
    connectors,
    ..SPEC_DEFAULTS
};

/// A trainable linear to 128 then L2 normalisation on each side.
fn connectors(
    teacher: &TensorInfo,
    student: &TensorInfo,
    options: &OptionValues,
) -> Result<Vec<Connector>> {
    embeddings_on_both_sides(teacher, student, options, &[Layer::L2Normalize])
}

/// `loss(out_s / Z_s) + loss(out_t / Z_t)` with the NCE loss of METHODS.md 13; memories and Z
/// are inputs, their updates outputs.
pub fn build(ctx: &mut LossContext, pairs: &[&TapPair]) -> Result<Option<String>> {
    let pair = pairs[0];
    let n_data = ctx.option("n_data")?.as_i64();
    let k = ctx.option("negatives")?.as_i64();
    let feat_dim = ctx.option("feat_dim")?.as_i64();
    let temperature = ctx.option("temperature")?.as_f64() as f32;
    let momentum = ctx.option("momentum")?.as_f64() as f32;
    let e_s = ctx.tap(pair, Side::Student);
    let e_t = ctx.tap(pair, Side::Teacher);
    let batch_dim = ctx.batch_dim.clone();
    let state = |name: &str, dtype: &str, shape: Vec<Dim>| Role::new(name, "state", dtype, shape);
    let memory_shape = vec![Dim::Fixed(n_data), Dim::Fixed(feat_dim)];
    ctx.state_inputs.extend([
        state(INDEX, "int64", vec![batch_dim.clone()]).indexing(n_data),
        state(CONTRAST_INDEX, "int64", vec![batch_dim, Dim::Fixed(k + 1)]).indexing(n_data),
        state(MEMORY_STUDENT, "float32", memory_shape.clone()),
        state(MEMORY_TEACHER, "float32", memory_shape.clone()),
        state(Z, "float32", vec![Dim::Fixed(2)]),
    ]);
    let image = ctx.image.clone();
    let b = &mut *ctx.b;
    // Scores: the teacher's embedding against the student memory, and the other way round.
    let out_t = scores(
        b,
        MEMORY_STUDENT,
        &e_t,
        k,
        temperature,
        "kd/crd/teacher_scores",
    );
    let out_s = scores(
        b,
        MEMORY_TEACHER,
        &e_s,
        k,
        temperature,
        "kd/crd/student_scores",
    );
    let z_s = normaliser(b, &out_s, 0, n_data, "kd/crd/z_student");
    let z_t = normaliser(b, &out_t, 1, n_data, "kd/crd/z_teacher");
    let p_s = b.div(&out_s, &z_s, "kd/crd/student_normalised");
    let p_t = b.div(&out_t, &z_t, "kd/crd/teacher_normalised");
    let batch = b.batch_size(&image, "kd/crd/batch");
    let l_s = contrast_loss(b, &p_s, k, n_data, &batch, "kd/crd/student_loss");
    let l_t = contrast_loss(b, &p_t, k, n_data, &batch, "kd/crd/teacher_loss");
    let term = b.add(&l_s, &l_t, "kd/crd/term");
    // State updates: memories move towards this batch's embeddings; Z is fixed once estimated.
    for (memory, embedding, role) in [
        (MEMORY_STUDENT, &e_s, "student"),
        (MEMORY_TEACHER, &e_t, "teacher"),
    ] {
        let next = update_memory(
            b,
            memory,
            embedding,
            momentum,
            &format!("kd/crd/memory_{role}_update"),
        );
        let output = format!("{memory}_next");
        b.node("Identity", &[&next], &[&output], vec![], &output);
        ctx.state_outputs
            .push(state(&output, "float32", memory_shape.clone()));
    }
    let z_both = b.op(
        "Concat",
        &[&z_s, &z_t],
        vec![("axis", Attr::Int(0))],
        "kd/crd/z_used",
    );
    let z_next = format!("{Z}_next");
    b.node("Identity", &[&z_both], &[&z_next], vec![], &z_next);
    ctx.state_outputs
        .push(state(&z_next, "float32", vec![Dim::Fixed(2)]));
    Ok(Some(term))
}

/// `exp(memory[contrast_index] . e / tau)`, shape [B, K+1].
fn scores(
    b: &mut GraphBuilder,
    memory: &str,
    embedding: &str,
    k: i64,
    temperature: f32,
    base: &str,
) -> String {
    let weights = b.op(
        "Gather",
        &[memory, CONTRAST_INDEX],
        vec![("axis", Attr::Int(0))],
        &format!("{base}/memory_rows"),
    );
    let column = b.unsqueeze(embedding, &[2], &format!("{base}/embedding_column"));
    let dots = b.matmul(&weights, &column, &format!("{base}/dots"));
    let flat = b.reshape(&dots, &[-1, k + 1], &format!("{base}/flat"));
    let tau = b.scalar(&format!("{base}/tau"), temperature);
    let scaled = b.div(&flat, &tau, &format!("{base}/scaled"));
    b.unary("Exp", &scaled, base)
}

/// `z[slot]` where it is set (>= 0), else `mean(out) * n_data` from this batch, without gradient; shape [1].
fn normaliser(b: &mut GraphBuilder, out: &str, slot: i64, n_data: i64, base: &str) -> String {
    let index = b.const_i64(&format!("{base}/slot"), &[1], &[slot]);
    let given = b.op(
        "Gather",
        &[Z, &index],
        vec![("axis", Attr::Int(0))],
        &format!("{base}/given"),
    );
    let mean = b.mean_all(out, &format!("{base}/batch_mean"));
    let n = b.scalar(&format!("{base}/n_data"), n_data as f32);
    let estimate = b.mul(&mean, &n, &format!("{base}/estimate"));
    let detached = b.detach_positive(&estimate, &format!("{base}/estimate_detached"));
    let estimate = b.reshape(&detached, &[1], &format!("{base}/estimate_vector"));
    let zero = b.scalar(&format!("{base}/zero"), 0.0);
    let unset = b.binary("Less", &given, &zero, &format!("{base}/unset"));
    b.op("Where", &[&unset, &estimate, &given], vec![], base)
}

/// `-(sum_b log(x_0 / (x_0 + P + eps)) + sum_{b,k>=1} log(P / (x_k + P + eps))) / B`, `P = K / N`.
fn contrast_loss(
    b: &mut GraphBuilder,
    x: &str,
    k: i64,
    n_data: i64,
    batch: &str,
    base: &str,
) -> String {
    let p = b.scalar(&format!("{base}/p"), k as f32 / n_data as f32);
    let eps = b.scalar(&format!("{base}/eps"), EPS);
    let p_eps = b.add(&p, &eps, &format!("{base}/p_eps"));
    let positive = b.slice(x, 1, 0, 1, &format!("{base}/positive"));
    let negatives = b.slice(x, 1, 1, i64::MAX, &format!("{base}/negatives"));
    let positive_den = b.add(&positive, &p_eps, &format!("{base}/positive_den"));
    let positive_ratio = b.div(&positive, &positive_den, &format!("{base}/positive_ratio"));
    let positive_log = b.unary("Log", &positive_ratio, &format!("{base}/positive_log"));
    let negative_den = b.add(&negatives, &p_eps, &format!("{base}/negative_den"));
    let negative_ratio = b.div(&p, &negative_den, &format!("{base}/negative_ratio"));
    let negative_log = b.unary("Log", &negative_ratio, &format!("{base}/negative_log"));
    let positive_sum = b.sum_all(&positive_log, &format!("{base}/positive_sum"));
    let negative_sum = b.sum_all(&negative_log, &format!("{base}/negative_sum"));
    let total = b.add(&positive_sum, &negative_sum, &format!("{base}/total"));
    let mean = b.div(&total, batch, &format!("{base}/mean"));
    b.unary("Neg", &mean, base)
}

/// `memory[index] <- N(m * memory[index] + (1 - m) * e)`.
fn update_memory(
    b: &mut GraphBuilder,
    memory: &str,
    embedding: &str,
    momentum: f32,
    base: &str,
) -> String {
    let rows = b.op(
        "Gather",
        &[memory, INDEX],
        vec![("axis", Attr::Int(0))],
        &format!("{base}/rows"),
    );
    let m = b.scalar(&format!("{base}/momentum"), momentum);
    let one_minus = b.scalar(&format!("{base}/one_minus_momentum"), 1.0 - momentum);
    let kept = b.mul(&rows, &m, &format!("{base}/kept"));
    let fresh = b.mul(embedding, &one_minus, &format!("{base}/fresh"));
    let mixed = b.add(&kept, &fresh, &format!("{base}/mixed"));
    let normalised = b.l2_normalize(&mixed, 1, &format!("{base}/normalised"));
    let indices = b.unsqueeze(INDEX, &[1], &format!("{base}/indices"));
    b.op("ScatterND", &[memory, &indices, &normalised], vec![], base)
}
