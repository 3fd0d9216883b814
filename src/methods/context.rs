//! What a method's loss builder works with: the graph builder, the joint graph's names for tap
//! tensors, and helpers that apply a pair's pooling and connectors.

use super::init::{torch_default, Stream};
use crate::analysis::shapes::fixed;
use crate::error::Result;
use crate::onnx::builder::{Attr, GraphBuilder};
use crate::plan::{
    Connector, ConvInit, Hyper, Layer, MethodName, OptionValue, Role, Side, TapKind, TapPair,
    TrainingStage,
};

/// The prefix of every teacher name in the joint graph.
pub const TEACHER_PREFIX: &str = "teacher/";

pub struct LossContext<'a> {
    pub b: &'a mut GraphBuilder,
    pub method: MethodName,
    pub hyper: &'a Hyper,
    pub stage: TrainingStage,
    /// The student's first input: its batch dimension is the batch size.
    pub image: String,
    /// That batch dimension, for the shapes of state inputs.
    pub batch_dim: crate::analysis::Dim,
    /// Connectors built as constants rather than parameters (FT's paraphraser in the main stage).
    pub frozen: &'a [&'static str],
    /// State the method reads (CRD's memories) and writes back, added to the graph's inputs and outputs.
    pub state_inputs: Vec<Role>,
    pub state_outputs: Vec<Role>,
}

impl LossContext<'_> {
    /// `kd/<method>/<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("kd/{}/{what}", self.method)
    }

    /// The value of one of the method's options.
    pub fn option(&self, key: &str) -> Result<OptionValue> {
        self.hyper.option(self.method, key)
    }

    /// `sum(terms) / B`, the method's term (AB's and OFD's stage sums are per sample).
    pub fn per_sample_sum(&mut self, terms: &[String]) -> String {
        let sum = self.b.sum_of(terms, &self.name("stage_sum"));
        let batch = self.b.batch_size(&self.image, &self.name("batch"));
        self.b.div(&sum, &batch, &self.name("term"))
    }

    /// The joint graph's name of a pair's teacher tensor.
    pub fn teacher(&self, pair: &TapPair) -> String {
        format!("{TEACHER_PREFIX}{}", pair.teacher.tensor)
    }

    /// The joint graph's name of a pair's student tensor.
    pub fn student(&self, pair: &TapPair) -> String {
        pair.student.tensor.clone()
    }

    /// A side's tap after its connector (if any) and pooling (if any), in the method's order.
    pub fn tap(&mut self, pair: &TapPair, side: Side) -> String {
        let mut x = match side {
            Side::Teacher => self.teacher(pair),
            Side::Student => self.student(pair),
        };
        let mut channels = match side {
            Side::Teacher => pair.teacher.shape.get(1).and_then(fixed),
            Side::Student => pair.student.shape.get(1).and_then(fixed),
        };
        // An embedding read where a convolutional classifier reads it (SqueezeNet): a map,
        // averaged over space into the vector a linear classifier would read.
        let info = match side {
            Side::Teacher => &pair.teacher,
            Side::Student => &pair.student,
        };
        if self.method.spec().taps == TapKind::Embedding && info.shape.len() == 4 {
            let base = self.name(&format!("{}/{side}_embedding", pair.stage));
            let pooled = self
                .b
                .unary("GlobalAveragePool", &x, &format!("{base}/pooled"));
            x = self.b.op(
                "Flatten",
                &[&pooled],
                vec![("axis", Attr::Int(1))],
                &format!("{base}/flat"),
            );
        }
        let pool_first = self.method.spec().pool_before_connector;
        if pool_first {
            x = self.pool(pair, side, &x, channels);
        }
        if let Some(connector) = pair.connectors.iter().find(|c| c.side == side) {
            x = self.connect(pair, connector, &x);
            channels = connector.out_channels().or(channels);
        }
        if !pool_first {
            x = self.pool(pair, side, &x, channels);
        }
        x
    }

    fn pool(&mut self, pair: &TapPair, side: Side, x: &str, channels: Option<i64>) -> String {
        match pair.pool.as_ref().filter(|p| p.side == side) {
            Some(pool) => {
                let name = self.name(&format!("{}/{side}_pool", pair.stage));
                self.b
                    .adaptive_pool(x, channels.unwrap_or(0), pool.from, pool.to, &name)
            }
            None => x.to_string(),
        }
    }

    /// (C, H, W) of a side's tap as [`tap`](Self::tap) returns it (after connector and pooling).
    pub fn tap_chw(&self, pair: &TapPair, side: Side) -> (i64, i64, i64) {
        let info = match side {
            Side::Teacher => &pair.teacher,
            Side::Student => &pair.student,
        };
        let dims: Vec<i64> = info
            .shape
            .iter()
            .skip(1)
            .map(|d| fixed(d).unwrap_or(0))
            .collect();
        let (mut c, mut h, mut w) = (
            dims.first().copied().unwrap_or(0),
            dims.get(1).copied().unwrap_or(1),
            dims.get(2).copied().unwrap_or(1),
        );
        if let Some(out) = pair
            .connectors
            .iter()
            .find(|k| k.side == side)
            .and_then(|k| k.out_channels())
        {
            c = out;
        }
        if let Some(pool) = pair.pool.as_ref().filter(|p| p.side == side) {
            (h, w) = pool.to;
        }
        (c, h, w)
    }

    /// Builds a connector's layers on `x`; parameters are named
    /// `kd/<method>/<stage>/<connector>/<layer><i>.<param>`.
    pub fn connect(&mut self, pair: &TapPair, connector: &Connector, x: &str) -> String {
        let side = match connector.side {
            Side::Teacher => "teacher_",
            Side::Student => "",
        };
        let prefix = self.name(&format!("{}/{side}{}", pair.stage, connector.name));
        let doc = format!(
            "{} {} of the {} pair {}",
            self.method, connector.name, connector.side, pair.stage
        );
        let trainable = !self.frozen.contains(&connector.name);
        let mut x = x.to_string();
        for (i, layer) in connector.layers.iter().enumerate() {
            x = self.layer(
                layer,
                &x,
                &format!("{prefix}/{}{i}", layer_kind(layer)),
                &doc,
                trainable,
            );
        }
        x
    }

    /// A learned tensor: a parameter, or a constant where the connector is frozen.
    fn learned(
        &mut self,
        name: &str,
        dims: &[i64],
        values: &[f32],
        running_statistic: bool,
        trainable: bool,
        doc: &str,
    ) -> String {
        if trainable {
            self.b.parameter(name, dims, values, running_statistic, doc)
        } else {
            self.b.const_f32(name, dims, values)
        }
    }

    fn layer(&mut self, layer: &Layer, x: &str, base: &str, doc: &str, trainable: bool) -> String {
        let out = match layer {
            Layer::Conv {
                in_channels,
                out_channels,
                kernel,
                stride,
                pad,
                bias,
                init,
            } => {
                let fan_in = in_channels * kernel[0] * kernel[1];
                let dims = [*out_channels, *in_channels, kernel[0], kernel[1]];
                let wname = format!("{base}.weight");
                let w = self.learned(
                    &wname,
                    &dims,
                    &conv_init(init, &wname, &dims),
                    false,
                    trainable,
                    doc,
                );
                let mut inputs = vec![x.to_string(), w];
                if *bias {
                    let bname = format!("{base}.bias");
                    let values = torch_default(&bname, *out_channels as usize, fan_in);
                    inputs.push(self.learned(
                        &bname,
                        &[*out_channels],
                        &values,
                        false,
                        trainable,
                        doc,
                    ));
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let attrs = vec![
                    ("kernel_shape", Attr::Ints(kernel.to_vec())),
                    ("strides", Attr::Ints(vec![*stride, *stride])),
                    ("pads", Attr::Ints(vec![*pad, *pad, *pad, *pad])),
                ];
                self.b.op("Conv", &refs, attrs, base)
            }
            Layer::Upsample2x {
                channels,
                height,
                width,
            } => {
                let b = &mut *self.b;
                let expanded = b.unsqueeze(x, &[3, 5], &format!("{base}/unsqueezed"));
                let repeat = b.const_i64(&format!("{base}/repeat"), &[6], &[1, 1, 1, 2, 1, 2]);
                let tiled = b.binary("Expand", &expanded, &repeat, &format!("{base}/expanded"));
                b.reshape(&tiled, &[-1, *channels, 2 * height, 2 * width], base)
            }
            Layer::BatchNorm { channels } => {
                let c = *channels as usize;
                let scale = self.learned(
                    &format!("{base}.weight"),
                    &[*channels],
                    &vec![1.0; c],
                    false,
                    trainable,
                    doc,
                );
                let shift = self.learned(
                    &format!("{base}.bias"),
                    &[*channels],
                    &vec![0.0; c],
                    false,
                    trainable,
                    doc,
                );
                let mean = self.learned(
                    &format!("{base}.running_mean"),
                    &[*channels],
                    &vec![0.0; c],
                    true,
                    trainable,
                    doc,
                );
                let var = self.learned(
                    &format!("{base}.running_var"),
                    &[*channels],
                    &vec![1.0; c],
                    true,
                    trainable,
                    doc,
                );
                let inputs = [x, &scale, &shift, &mean, &var];
                self.b.op(
                    "BatchNormalization",
                    &inputs,
                    vec![("epsilon", Attr::Float(1e-5))],
                    base,
                )
            }
            Layer::Relu => self.b.unary("Relu", x, base),
            Layer::LeakyRelu { slope } => self.b.op(
                "LeakyRelu",
                &[x],
                vec![("alpha", Attr::Float(*slope as f32))],
                base,
            ),
            Layer::Linear {
                in_features,
                out_features,
            } => {
                let count = (in_features * out_features) as usize;
                let wname = format!("{base}.weight");
                let values = torch_default(&wname, count, *in_features);
                let w = self.learned(
                    &wname,
                    &[*out_features, *in_features],
                    &values,
                    false,
                    trainable,
                    doc,
                );
                let bname = format!("{base}.bias");
                let values = torch_default(&bname, *out_features as usize, *in_features);
                let bias = self.learned(&bname, &[*out_features], &values, false, trainable, doc);
                self.b.op(
                    "Gemm",
                    &[x, &w, &bias],
                    vec![("transB", Attr::Int(1))],
                    base,
                )
            }
            Layer::L2Normalize => self.b.l2_normalize(x, 1, base),
        };
        self.b.doc_last(doc);
        out
    }
}

/// A conv weight [out, in, kh, kw]: PyTorch's default, or N(0, 2/(kh*kw*out)) as OFD's connector.
fn conv_init(init: &ConvInit, name: &str, dims: &[i64; 4]) -> Vec<f32> {
    let count = dims.iter().product::<i64>() as usize;
    match init {
        ConvInit::TorchDefault => torch_default(name, count, dims[1] * dims[2] * dims[3]),
        ConvInit::HeOut => Stream::for_name(name)
            .normal(count, (2.0 / (dims[0] * dims[2] * dims[3]) as f64).sqrt()),
    }
}

fn layer_kind(layer: &Layer) -> &'static str {
    match layer {
        Layer::Conv { .. } => "conv",
        Layer::Upsample2x { .. } => "upsample",
        Layer::BatchNorm { .. } => "bn",
        Layer::Relu => "relu",
        Layer::LeakyRelu { .. } => "leaky_relu",
        Layer::Linear { .. } => "linear",
        Layer::L2Normalize => "normalize",
    }
}
