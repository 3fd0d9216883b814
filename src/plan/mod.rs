//! Pairing teacher and student taps for the chosen methods: a plain value that the dry-run report
//! renders and the graph builder consumes. The plain types shared by the planner, the methods and
//! the builder (specs, connectors, pairs, hyper-parameters, roles) live here, below them all.

pub mod connector;
pub mod spec;
mod tap_names;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::analysis::shapes::fixed;
use crate::analysis::{
    show_shape, BatchNormParams, ModelAnalysis, NetworkStage, Shape, TensorInfo,
};
use crate::error::{Error, Result};
pub use connector::{Connector, ConvInit, Layer, Side};
pub use spec::{
    option_value, InitStage, MethodName, MethodSpec, OptionKind, OptionSpec, OptionValue,
    OptionValues, TapKind, Weights, KD, SPEC_DEFAULTS,
};

/// How the stage ends (and spatial maps) of two models are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pairing {
    /// By position, as RepDistiller pairs `feat[1:-1]` (equal counts); where the counts differ,
    /// the deepest maps of each, the shallower extra maps of the larger model unused.
    #[default]
    Position,
    /// Maps of equal resolution (H x W); maps without a partner are unused.
    Resolution,
}

/// What the user asked for, before any model is looked at.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// How stage ends are paired.
    pub pairing: Pairing,
    /// Method ids as typed (`kd`, `at`, ...).
    pub methods: Vec<String>,
    /// `--tap TEACHER=STUDENT` pairs that replace the automatic pairing of feature methods.
    pub taps: Vec<(String, String)>,
    pub gamma: Option<f64>,
    pub alpha: Option<f64>,
    /// `--beta B` (None: every method) or `--beta METHOD=B`.
    pub betas: Vec<(Option<String>, f64)>,
    pub temperature: f64,
    /// Method options given on the command line, by flag (`crd-n-data`).
    pub method_options: Vec<(String, OptionValue)>,
    /// OFD: run the teacher's BatchNorms on batch statistics (as the reference) instead of folding them.
    pub teacher_batch_statistics: bool,
    /// Sizes of the image input besides the batch, for models exported with symbolic H and W.
    pub input_shape: Option<Vec<i64>>,
}

/// The weights of the total loss `gamma * CE + alpha * KD_T + sum beta_m * L_m`, and every
/// method's options (serialised as `"<method>": {...}` beside the weights).
#[derive(Debug, Clone, Serialize)]
pub struct Hyper {
    pub gamma: f64,
    pub alpha: f64,
    pub temperature: f64,
    pub beta: BTreeMap<MethodName, f64>,
    #[serde(flatten, serialize_with = "ordered_map")]
    pub options: Vec<(MethodName, OptionValues)>,
    /// The teacher's BatchNorms run on batch statistics instead of being folded.
    pub teacher_batch_statistics: bool,
}

impl Hyper {
    /// The value of a method's option, or the usage error that says how to give it.
    pub fn option(&self, method: MethodName, key: &str) -> Result<OptionValue> {
        self.options
            .iter()
            .find(|(m, _)| *m == method)
            .and_then(|(_, values)| option_value(values, key))
            .ok_or_else(|| {
                let spec = method.spec().options.iter().find(|o| o.key == key);
                Error::usage(match spec {
                    Some(o) => missing_option(method, o),
                    None => format!("{method} has no option `{key}`"),
                })
            })
    }
}

/// `<method> needs --<flag> <VALUE>, <help>`.
pub fn missing_option(method: MethodName, option: &OptionSpec) -> String {
    format!(
        "{method} needs --{} {}, {}",
        option.flag, option.value_name, option.help
    )
}

/// `{"crd": {"n_data": ..., ...}}` in the methods' and the options' own order.
fn ordered_map<S: Serializer>(
    entries: &[(MethodName, OptionValues)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    struct Values<'a>(&'a OptionValues);
    impl Serialize for Values<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }
    s.collect_map(entries.iter().map(|(m, v)| (m, Values(v))))
}

/// The training stage a graph is built for: the init stage of AB, FSP and FT, or the main one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainingStage {
    Init,
    Main,
}

impl TrainingStage {
    pub fn name(self) -> &'static str {
        match self {
            TrainingStage::Init => "init",
            TrainingStage::Main => "main",
        }
    }
}

/// A graph input or output and what it is for, in the sidecar.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Role {
    pub name: String,
    pub role: String,
    pub dtype: String,
    pub shape: Shape,
    /// For integer inputs that index something (labels, CRD's sample indices): every value
    /// lies in `0..index_bound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_bound: Option<i64>,
}

impl Role {
    pub fn new(name: &str, role: &str, dtype: &str, shape: Shape) -> Self {
        Role {
            name: name.into(),
            role: role.into(),
            dtype: dtype.into(),
            shape,
            index_bound: None,
        }
    }

    /// An integer input whose values index `0..bound`.
    pub fn indexing(mut self, bound: i64) -> Self {
        self.index_bound = Some(bound);
        self
    }
}

/// Adaptive average pooling of the larger map of a pair down to the smaller.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub side: Side,
    pub from: (i64, i64),
    pub to: (i64, i64),
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}x{} -> {}x{}",
            self.side, self.from.0, self.from.1, self.to.0, self.to.1
        )
    }
}

impl Serialize for Pool {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One teacher tensor compared with one student tensor by one method.
#[derive(Debug, Clone, Serialize)]
pub struct TapPair {
    pub method: MethodName,
    /// The pair's label, used in the names of what the method adds: the stage name both models
    /// give the pair's maps, or `<teacher stage>_<student stage>` where they differ.
    pub stage: String,
    /// Each model's own name of its tap (`stage3`, `stem`, `embedding`, `tap1`, ...).
    pub teacher_stage: String,
    pub student_stage: String,
    /// Each tap's module path, where the export records one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student_module: Option<String>,
    pub teacher: TensorInfo,
    pub student: TensorInfo,
    pub pool: Option<Pool>,
    /// The connectors in words (None when there are none), for people and the JSON report.
    pub connector: Option<String>,
    #[serde(skip)]
    pub connectors: Vec<Connector>,
    /// The BatchNorm that feeds the teacher's tap, for methods that read its parameters (OFD).
    #[serde(skip)]
    pub teacher_batchnorm: Option<BatchNormParams>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    #[serde(rename = "teacher")]
    pub teacher_file: String,
    #[serde(rename = "student")]
    pub student_file: String,
    pub methods: Vec<MethodName>,
    pub hyper: Hyper,
    pub pairing: Pairing,
    pub pairs: Vec<TapPair>,
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub teacher: ModelAnalysis,
    #[serde(skip)]
    pub student: ModelAnalysis,
}

/// Pairs the taps of two analysed models for the chosen methods; `known` lists every method
/// kdgraph has (the registry), against which the options' names are resolved.
pub fn plan(
    teacher: ModelAnalysis,
    student: ModelAnalysis,
    options: &PlanOptions,
    known: &[MethodName],
) -> Result<Plan> {
    let ids = || {
        known
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if options.methods.is_empty() {
        return Err(Error::usage(format!(
            "choose at least one --method ({})",
            ids()
        )));
    }
    let resolve = |id: &str| -> Result<MethodName> {
        known
            .iter()
            .copied()
            .find(|m| m.as_str() == id)
            .ok_or_else(|| Error::usage(format!("`{id}` is not a method ({})", ids())))
    };
    let mut methods = Vec::new();
    for id in &options.methods {
        let method = resolve(id)?;
        if !methods.contains(&method) {
            methods.push(method);
        }
    }
    let mut notes = Vec::new();
    let hyper = hyper_parameters(&methods, options, &resolve, &mut notes)?;
    if hyper.alpha > 0.0 && !methods.iter().any(|m| m.is_kd()) {
        methods.push(resolve(KD)?);
        notes.push(format!(
            "--alpha {} adds the KD term on the logits",
            hyper.alpha
        ));
    }
    // KD's term comes first in the graph's outputs, after CE.
    methods.sort_by_key(|m| !m.is_kd());
    if methods.iter().any(|m| m.is_kd()) && hyper.alpha == 0.0 {
        notes.push("--alpha 0 gives the KD term no weight: loss/kd is computed and reported but does not train".into());
    }
    check_inputs(&teacher, &student)?;
    if teacher
        .inputs
        .iter()
        .map(|i| &i.name)
        .ne(student.inputs.iter().map(|i| &i.name))
    {
        notes.push("teacher and student name their inputs differently: the teacher reads the student's inputs".into());
    }
    let mut warnings = Vec::new();
    if student.batchnorms == 0 && student.other_norms == 0 {
        warnings.push(format!(
            "student `{}` has no normalisation (BatchNorm, LayerNorm, GroupNorm), so it will train without any; \
             if its BatchNorms were folded away at export (an eval-mode export, or torch.export's default \
             optimisation even in training mode), re-export it with kdgraph.export_student(model, x, path) from \
             the Python package, or torch.onnx.export(copy.deepcopy(model).train(), (x,), path, dynamo=False, \
             training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)",
            student.model
        ));
    }
    for model in [&teacher, &student] {
        if let Some(batch) = model.inputs[0].shape.first().and_then(fixed) {
            warnings.push(format!(
                "`{}` fixes the batch size of input `{}` at {batch}: the joint graph trains (and is checked) at batch {batch} only; \
                 export it with a dynamic batch axis (dynamic_axes or dynamic_shapes) to train at other sizes",
                model.model, model.inputs[0].name
            ));
        }
    }
    for &method in &methods {
        for option in method.spec().options {
            if hyper.option(method, option.key).is_err() {
                warnings.push(format!(
                    "{method}: writing the graph needs --{} {}, {}",
                    option.flag, option.value_name, option.help
                ));
            }
        }
    }
    let overrides = resolve_taps(&teacher, &student, &options.taps, &mut notes)?;
    let mut pairs = Vec::new();
    for &method in &methods {
        let spec = method.spec();
        let candidates = match (&overrides, spec.taps) {
            (Some(_), TapKind::Logits) => {
                notes.push("--tap does not apply to KD, which always compares the logits".into());
                vec![logits_pair(&teacher, &student)?]
            }
            (_, TapKind::Logits) => vec![logits_pair(&teacher, &student)?],
            (Some(given), kind) => {
                check_tap_ranks(method, kind, given)?;
                given.clone()
            }
            (None, kind) => {
                let how = (method, options.pairing);
                automatic_pairs(&teacher, &student, kind, how, known, &mut notes)?
            }
        };
        let values = hyper
            .options
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        for (t_stage, s_stage, t, s) in candidates {
            let stage = if t_stage == s_stage {
                s_stage.clone()
            } else {
                format!("{t_stage}_{s_stage}")
            };
            let connectors = (spec.connectors)(&t, &s, &values)?;
            let pool = if spec.pools { pool_for(&t, &s) } else { None };
            let connector = (!connectors.is_empty()).then(|| {
                connectors
                    .iter()
                    .map(Connector::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            });
            let pair = TapPair {
                method,
                stage,
                teacher_module: teacher.module_of(&t.tensor),
                student_module: student.module_of(&s.tensor),
                teacher_stage: t_stage,
                student_stage: s_stage,
                teacher_batchnorm: teacher.batchnorm_feeding(&t.tensor).cloned(),
                teacher: t,
                student: s,
                pool,
                connector,
                connectors,
            };
            pairs.push(pair);
        }
        if let Some(review) = spec.review_pairs {
            let own: Vec<&TapPair> = pairs.iter().filter(|p| p.method == method).collect();
            let (more_notes, more_warnings) = review(&own);
            notes.extend(more_notes);
            warnings.extend(more_warnings);
        }
    }
    Ok(Plan {
        teacher_file: teacher.model.clone(),
        student_file: student.model.clone(),
        methods,
        hyper,
        pairing: options.pairing,
        pairs,
        notes,
        warnings,
        teacher,
        student,
    })
}

fn hyper_parameters(
    methods: &[MethodName],
    options: &PlanOptions,
    resolve: &dyn Fn(&str) -> Result<MethodName>,
    notes: &mut Vec<String>,
) -> Result<Hyper> {
    let base = methods
        .iter()
        .find(|m| m.is_kd())
        .unwrap_or(&methods[0])
        .spec()
        .weights;
    let gamma = options.gamma.unwrap_or(base.gamma);
    let alpha = options.alpha.unwrap_or(base.alpha);
    let feature_methods: Vec<MethodName> = methods.iter().copied().filter(|m| !m.is_kd()).collect();
    let mut beta: BTreeMap<MethodName, f64> = feature_methods
        .iter()
        .map(|&m| (m, m.spec().weights.beta))
        .collect();
    for (method, value) in &options.betas {
        let value = *value;
        match method.as_deref().map(resolve).transpose()? {
            Some(m) if !beta.contains_key(&m) => {
                return Err(Error::usage(format!(
                    "--beta {m}={value}: {m} is not among the chosen feature methods"
                )))
            }
            Some(m) => {
                beta.insert(m, value);
            }
            None if feature_methods.len() > 1 => {
                return Err(Error::usage(format!(
                "--beta {value} is ambiguous with several methods; say which: --beta {}={value}",
                feature_methods[0]
            )))
            }
            None => beta.values_mut().for_each(|b| *b = value),
        }
    }
    for (name, value) in [("--gamma", gamma), ("--alpha", alpha)]
        .into_iter()
        .chain(beta.values().map(|&b| ("--beta", b)))
    {
        if !(value.is_finite() && value >= 0.0) {
            return Err(Error::usage(format!(
                "{name} must be a finite number >= 0, not {value}"
            )));
        }
    }
    if !(options.temperature.is_finite() && options.temperature > 0.0) {
        return Err(Error::usage(format!(
            "-T (the KD temperature) must be > 0, not {}",
            options.temperature
        )));
    }
    Ok(Hyper {
        gamma,
        alpha,
        temperature: options.temperature,
        beta,
        options: method_options(methods, &options.method_options, notes)?,
        teacher_batch_statistics: options.teacher_batch_statistics,
    })
}

/// Each chosen method's options: given, else default; checked against their ranges and the
/// method's own cross-checks. An option of a method that was not chosen is an error.
fn method_options(
    methods: &[MethodName],
    given: &[(String, OptionValue)],
    notes: &mut Vec<String>,
) -> Result<Vec<(MethodName, OptionValues)>> {
    for (flag, _) in given {
        if !methods
            .iter()
            .any(|m| m.spec().options.iter().any(|o| o.flag == flag))
        {
            return Err(Error::usage(format!(
                "--{flag} is an option of a method that was not chosen; add that --method or drop the option"
            )));
        }
    }
    let mut all = Vec::new();
    for &method in methods {
        let spec = method.spec();
        if spec.options.is_empty() {
            continue;
        }
        let mut values = OptionValues::new();
        let mut given_keys = Vec::new();
        for option in spec.options {
            let value = given
                .iter()
                .rev()
                .find(|(flag, _)| flag == option.flag)
                .map(|(_, v)| *v)
                .inspect(|_| given_keys.push(option.key))
                .or(option.default);
            let Some(value) = value else { continue };
            let v = value.as_f64();
            if !(v.is_finite() && option.min <= v && v <= option.max) {
                return Err(Error::usage(format!(
                    "--{} {value}: must be from {} to {} ({})",
                    option.flag, option.min, option.max, option.help
                )));
            }
            values.push((option.key, value));
        }
        if let Some(settle) = spec.settle_options {
            notes.extend(settle(&mut values, &given_keys)?);
        }
        all.push((method, values));
    }
    Ok(all)
}

fn check_inputs(teacher: &ModelAnalysis, student: &ModelAnalysis) -> Result<()> {
    if teacher.inputs.len() != student.inputs.len() {
        return Err(Error::invalid_model(format!(
            "teacher `{}` has {} inputs and student `{}` has {}; both must read the same images",
            teacher.model,
            teacher.inputs.len(),
            student.model,
            student.inputs.len()
        )));
    }
    for (t, s) in teacher.inputs.iter().zip(&student.inputs) {
        let compatible = t.shape.len() == s.shape.len()
            && t.shape
                .iter()
                .zip(&s.shape)
                .all(|(a, b)| match (fixed(a), fixed(b)) {
                    (Some(x), Some(y)) => x == y,
                    _ => true,
                });
        if !compatible {
            return Err(Error::invalid_model(format!(
                "teacher `{}` reads `{}` {} but student `{}` reads `{}` {}; export both at the same input size",
                teacher.model,
                t.name,
                show_shape(&t.shape),
                student.model,
                s.name,
                show_shape(&s.shape)
            )));
        }
    }
    Ok(())
}

/// (teacher's name of its tap, student's name of its tap, teacher tap, student tap).
type Candidate = (String, String, TensorInfo, TensorInfo);

fn logits_pair(teacher: &ModelAnalysis, student: &ModelAnalysis) -> Result<Candidate> {
    if teacher.class_count() != student.class_count() {
        return Err(Error::unsupported(format!(
            "KD compares logits, but teacher `{}` has {} classes and student `{}` has {}; \
             use a feature method, or a student with the teacher's classes",
            teacher.model,
            show_count(teacher.class_count()),
            student.model,
            show_count(student.class_count())
        )));
    }
    Ok((
        "logits".into(),
        "logits".into(),
        teacher.logits.clone(),
        student.logits.clone(),
    ))
}

fn show_count(count: Option<i64>) -> String {
    count
        .map(|c| c.to_string())
        .unwrap_or_else(|| "an unknown number of".into())
}

fn automatic_pairs(
    teacher: &ModelAnalysis,
    student: &ModelAnalysis,
    kind: TapKind,
    (method, pairing): (MethodName, Pairing),
    known: &[MethodName],
    notes: &mut Vec<String>,
) -> Result<Vec<Candidate>> {
    let post = |s: &NetworkStage| s.info();
    let pre = |s: &NetworkStage| s.pre_relu_info().unwrap_or_else(|| s.info());
    let (t_stages, s_stages, pick): (
        &[NetworkStage],
        &[NetworkStage],
        &dyn Fn(&NetworkStage) -> TensorInfo,
    ) = match kind {
        TapKind::Logits => unreachable!("logits are paired before"),
        TapKind::Embedding => {
            return Ok(vec![(
                "embedding".into(),
                "embedding".into(),
                teacher.embedding.clone(),
                student.embedding.clone(),
            )])
        }
        TapKind::Hint(i) => {
            let (t, s) = (teacher.stages.get(i), student.stages.get(i));
            let (Some(t), Some(s)) = (t, s) else {
                return Err(Error::unsupported(format!(
                    "{method} taps spatial map feat[{i}] (the stem is feat[0]), but teacher `{}` has {} spatial maps \
                     and student `{}` has {}; choose the hint with --tap",
                    teacher.model,
                    teacher.stages.len(),
                    student.model,
                    student.stages.len()
                )));
            };
            return Ok(vec![(t.name.clone(), s.name.clone(), t.info(), s.info())]);
        }
        TapKind::LastSpatial => {
            let (t, s) = (last(teacher), last(student));
            return Ok(vec![(t.name.clone(), s.name.clone(), t.info(), s.info())]);
        }
        TapKind::StageEnds => (
            stages_after_stem(teacher),
            stages_after_stem(student),
            &post,
        ),
        TapKind::StageEndsPreRelu => {
            for model in [teacher, student] {
                for stage in stages_after_stem(model)
                    .iter()
                    .filter(|s| s.pre_relu.is_none())
                {
                    notes.push(format!(
                        "{method}: {} of `{}` has no ReLU at its end (no pre-ReLU tap); its output is used as it is",
                        stage.name, model.model
                    ));
                }
            }
            (stages_after_stem(teacher), stages_after_stem(student), &pre)
        }
        TapKind::AllSpatial => (teacher.stages.as_slice(), student.stages.as_slice(), &post),
    };
    let n = t_stages.len().min(s_stages.len());
    if n == 0 {
        let (role, model) = if t_stages.is_empty() {
            ("teacher", teacher)
        } else {
            ("student", student)
        };
        let maps = model
            .stages
            .iter()
            .map(|s| format!("{} {} `{}`", s.name, show_shape(&s.shape), s.tensor))
            .collect::<Vec<_>>()
            .join(", ");
        let logit_and_embedding: Vec<&str> = known
            .iter()
            .filter(|m| matches!(m.spec().taps, TapKind::Logits | TapKind::Embedding))
            .map(|m| m.as_str())
            .collect();
        return Err(Error::unsupported(format!(
            "{method} compares feature maps at stage ends, but {role} `{}` has no spatial map after its stem \
             (its spatial maps: {maps}; a transformer, say, keeps tokens after its patch embedding); \
             use a method on the logits or the embedding ({}), or pair tensors with --tap",
            model.model,
            logit_and_embedding.join(", ")
        )));
    }
    let pairs: Vec<(&NetworkStage, &NetworkStage)> = match pairing {
        Pairing::Position => {
            let (t_tail, s_tail) = (
                &t_stages[t_stages.len() - n..],
                &s_stages[s_stages.len() - n..],
            );
            t_tail.iter().zip(s_tail).collect()
        }
        Pairing::Resolution => {
            let size = |s: &NetworkStage| {
                (
                    s.shape.get(2).and_then(fixed),
                    s.shape.get(3).and_then(fixed),
                )
            };
            // The deepest map of each resolution on each side.
            let mut pairs = Vec::new();
            for t in t_stages {
                let later_same = t_stages.iter().rev().find(|o| size(o) == size(t));
                if later_same.map(|o| o.index) != Some(t.index) {
                    continue;
                }
                if let Some(s) = s_stages.iter().rev().find(|s| size(s) == size(t)) {
                    pairs.push((t, s));
                }
            }
            if pairs.is_empty() {
                return Err(Error::unsupported(format!(
                    "{method} with --pairing resolution: teacher `{}` and student `{}` have no stage ends of equal \
                     resolution; use --pairing position or --tap",
                    teacher.model, student.model
                )));
            }
            pairs
        }
    };
    for (role, model, stages, used) in [
        (
            "teacher",
            teacher,
            t_stages,
            pairs.iter().map(|p| p.0.index).collect::<Vec<_>>(),
        ),
        (
            "student",
            student,
            s_stages,
            pairs.iter().map(|p| p.1.index).collect(),
        ),
    ] {
        let unused: Vec<String> = stages
            .iter()
            .filter(|s| !used.contains(&s.index))
            .map(|s| format!("{} {} `{}`", s.name, show_shape(&s.shape), s.tensor))
            .collect();
        if !unused.is_empty() {
            notes.push(format!(
                "{method}: pairing by {}: {role} `{}` leaves {} unpaired",
                match pairing {
                    Pairing::Position => "position (the deepest maps of each model)",
                    Pairing::Resolution => "resolution",
                },
                model.model,
                unused.join(", ")
            ));
        }
    }
    Ok(pairs
        .into_iter()
        .map(|(t, s)| (t.name.clone(), s.name.clone(), pick(t), pick(s)))
        .collect())
}

/// `--tap` pairs must have the rank the method reads: feature maps, or embeddings.
fn check_tap_ranks(method: MethodName, kind: TapKind, given: &[Candidate]) -> Result<()> {
    let (rank, what) = match kind {
        TapKind::Embedding => (2, "an N x D embedding"),
        _ => (4, "an N x C x H x W feature map"),
    };
    for (_, _, t, s) in given {
        for info in [t, s] {
            if info.shape.len() != rank {
                return Err(Error::usage(format!(
                    "--tap: {method} reads {what}, but `{}` has shape {}; tap another tensor",
                    info.tensor,
                    show_shape(&info.shape)
                )));
            }
        }
    }
    Ok(())
}

fn last(model: &ModelAnalysis) -> &NetworkStage {
    model
        .stages
        .last()
        .expect("analysis guarantees at least one spatial map")
}

fn stages_after_stem(model: &ModelAnalysis) -> &[NetworkStage] {
    &model.stages[1.min(model.stages.len())..]
}

fn pool_for(teacher: &TensorInfo, student: &TensorInfo) -> Option<Pool> {
    let size = |i: &TensorInfo| match i.shape.as_slice() {
        [_, _, h, w] => Some((fixed(h)?, fixed(w)?)),
        _ => None,
    };
    let (t, s) = (size(teacher)?, size(student)?);
    match t.0.cmp(&s.0) {
        std::cmp::Ordering::Greater => Some(Pool {
            side: Side::Teacher,
            from: t,
            to: s,
        }),
        std::cmp::Ordering::Less => Some(Pool {
            side: Side::Student,
            from: s,
            to: t,
        }),
        std::cmp::Ordering::Equal => None,
    }
}

/// Resolves `--tap` names against both models and turns them into pairs.
fn resolve_taps(
    teacher: &ModelAnalysis,
    student: &ModelAnalysis,
    taps: &[(String, String)],
    notes: &mut Vec<String>,
) -> Result<Option<Vec<Candidate>>> {
    if taps.is_empty() {
        return Ok(None);
    }
    let mut pairs = Vec::with_capacity(taps.len());
    for (i, (t, s)) in taps.iter().enumerate() {
        let (t, t_note) = tap_names::resolve(teacher, "teacher", t)?;
        let (s, s_note) = tap_names::resolve(student, "student", s)?;
        notes.extend(t_note.into_iter().chain(s_note));
        let label = format!("tap{}", i + 1);
        pairs.push((label.clone(), label, t, s));
    }
    Ok(Some(pairs))
}
