//! What a method's loss builder works with: the graph builder, the joint graph's names for tap
//! tensors, and helpers that apply a pair's pooling and connectors.

use super::connector::{Connector, Layer, Side};
use super::init::torch_default;
use super::MethodName;
use crate::analysis::shapes::fixed;
use crate::onnx::builder::{Attr, GraphBuilder};
use crate::plan::{Hyper, TapPair};

/// The prefix of every teacher name in the joint graph.
pub const TEACHER_PREFIX: &str = "teacher/";

pub struct LossContext<'a> {
    pub b: &'a mut GraphBuilder,
    pub method: MethodName,
    pub hyper: &'a Hyper,
    /// The student's first input: its batch dimension is the batch size.
    pub image: String,
}

impl LossContext<'_> {
    /// `kd/<method>/<what>`.
    pub fn name(&self, what: &str) -> String {
        format!("kd/{}/{what}", self.method)
    }

    /// The joint graph's name of a pair's teacher tensor.
    pub fn teacher(&self, pair: &TapPair) -> String {
        format!("{TEACHER_PREFIX}{}", pair.teacher.tensor)
    }

    /// The joint graph's name of a pair's student tensor.
    pub fn student(&self, pair: &TapPair) -> String {
        pair.student.tensor.clone()
    }

    /// A side's tap after its connector (if any) and pooling (if any), in that order.
    pub fn tap(&mut self, pair: &TapPair, side: Side) -> String {
        let mut x = match side {
            Side::Teacher => self.teacher(pair),
            Side::Student => self.student(pair),
        };
        let mut channels = match side {
            Side::Teacher => pair.teacher.shape.get(1).and_then(fixed),
            Side::Student => pair.student.shape.get(1).and_then(fixed),
        };
        if let Some(connector) = pair.connectors.iter().find(|c| c.side == side) {
            x = self.connect(pair, connector, &x);
            channels = connector.out_channels().or(channels);
        }
        if let Some(pool) = pair.pool.as_ref().filter(|p| p.side == side) {
            let name = self.name(&format!("{}/{side}_pool", pair.stage));
            x = self.b.adaptive_pool(&x, channels.unwrap_or(0), pool.from, pool.to, &name);
        }
        x
    }

    /// (C, H, W) of a side's tap as [`tap`](Self::tap) returns it (after connector and pooling).
    pub fn tap_chw(&self, pair: &TapPair, side: Side) -> (i64, i64, i64) {
        let info = match side {
            Side::Teacher => &pair.teacher,
            Side::Student => &pair.student,
        };
        let dims: Vec<i64> = info.shape.iter().skip(1).map(|d| fixed(d).unwrap_or(0)).collect();
        let (mut c, mut h, mut w) = (dims.first().copied().unwrap_or(0), dims.get(1).copied().unwrap_or(1), dims.get(2).copied().unwrap_or(1));
        if let Some(out) = pair.connectors.iter().find(|k| k.side == side).and_then(|k| k.out_channels()) {
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
        let doc = format!("{} {} of the {} pair {}", self.method, connector.name, connector.side, pair.stage);
        let mut x = x.to_string();
        for (i, layer) in connector.layers.iter().enumerate() {
            x = self.layer(layer, &x, &format!("{prefix}/{}{i}", layer_kind(layer)), &doc);
        }
        x
    }

    fn layer(&mut self, layer: &Layer, x: &str, base: &str, doc: &str) -> String {
        let b = &mut *self.b;
        let out = match layer {
            Layer::Conv { in_channels, out_channels, kernel, stride, pad, bias } => {
                let fan_in = in_channels * kernel[0] * kernel[1];
                let dims = [*out_channels, *in_channels, kernel[0], kernel[1]];
                let count = dims.iter().product::<i64>() as usize;
                let wname = format!("{base}.weight");
                let w = b.parameter(&wname, &dims, &torch_default(&wname, count, fan_in), false, doc);
                let mut inputs = vec![x.to_string(), w];
                if *bias {
                    let bname = format!("{base}.bias");
                    inputs.push(b.parameter(&bname, &[*out_channels], &torch_default(&bname, *out_channels as usize, fan_in), false, doc));
                }
                let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let attrs = vec![
                    ("kernel_shape", Attr::Ints(kernel.to_vec())),
                    ("strides", Attr::Ints(vec![*stride, *stride])),
                    ("pads", Attr::Ints(vec![*pad, *pad, *pad, *pad])),
                ];
                b.op("Conv", &refs, attrs, base)
            }
            Layer::Upsample2x { channels, height, width } => {
                let expanded = b.unsqueeze(x, &[3, 5], &format!("{base}/unsqueezed"));
                let repeat = b.const_i64(&format!("{base}/repeat"), &[6], &[1, 1, 1, 2, 1, 2]);
                let tiled = b.op("Expand", &[&expanded, &repeat], vec![], &format!("{base}/expanded"));
                b.reshape(&tiled, &[-1, *channels, 2 * height, 2 * width], base)
            }
            Layer::BatchNorm { channels } => {
                let c = *channels as usize;
                let scale = b.parameter(&format!("{base}.weight"), &[*channels], &vec![1.0; c], false, doc);
                let shift = b.parameter(&format!("{base}.bias"), &[*channels], &vec![0.0; c], false, doc);
                let mean = b.parameter(&format!("{base}.running_mean"), &[*channels], &vec![0.0; c], true, doc);
                let var = b.parameter(&format!("{base}.running_var"), &[*channels], &vec![1.0; c], true, doc);
                b.op("BatchNormalization", &[x, &scale, &shift, &mean, &var], vec![("epsilon", Attr::Float(1e-5))], base)
            }
            Layer::Relu => b.unary("Relu", x, base),
            Layer::LeakyRelu { slope } => b.op("LeakyRelu", &[x], vec![("alpha", Attr::Float(*slope as f32))], base),
            Layer::Linear { in_features, out_features } => {
                let count = (in_features * out_features) as usize;
                let wname = format!("{base}.weight");
                let w = b.parameter(&wname, &[*out_features, *in_features], &torch_default(&wname, count, *in_features), false, doc);
                let bname = format!("{base}.bias");
                let bias = b.parameter(&bname, &[*out_features], &torch_default(&bname, *out_features as usize, *in_features), false, doc);
                b.op("Gemm", &[x, &w, &bias], vec![("transB", Attr::Int(1))], base)
            }
            Layer::L2Normalize => b.l2_normalize(x, 1, base),
        };
        b.doc_last(doc);
        out
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
