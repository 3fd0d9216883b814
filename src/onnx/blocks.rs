//! Loss building blocks shared by the methods, written with ops that both ONNX Runtime Training
//! (gradients) and tract (numerics) handle: stable log-softmax, row normalisation, pooling,
//! smooth-L1, batch similarity.

use super::builder::{Attr, GraphBuilder};

/// Floor under squared norms: `N(x) = x / max(||x||, 1e-12)` with a finite gradient at x = 0.
const NORM_FLOOR_SQUARED: f32 = 1e-24;
/// 2^24: scale of `log x` in [`GraphBuilder::detach_positive`]. |log x| <= 88.7 in float32, so
/// the scaled value stays within int32 (tract's float-to-int64 Cast saturates at 2^31).
const DETACH_SCALE: f32 = 16_777_216.0;

impl GraphBuilder {
    /// `log_softmax(z / temperature)` along axis 1, as `zc - log(sum(exp(zc)))` with `zc = z - max z`
    /// (TopK for the max: ReduceMax has no gradient in ORT, and tract's LogSoftmax is naive).
    pub fn log_softmax(&mut self, logits: &str, temperature: f32, name: &str) -> String {
        let z = if temperature == 1.0 {
            logits.to_string()
        } else {
            let t = self.scalar(&format!("{name}/T"), temperature);
            self.div(logits, &t, &format!("{name}/scaled"))
        };
        let k = self.const_i64(&format!("{name}/k"), &[1], &[1]);
        let max = self.unique(&format!("{name}/max"));
        let indices = self.unique(&format!("{name}/argmax"));
        self.node(
            "TopK",
            &[&z, &k],
            &[&max, &indices],
            vec![("axis", Attr::Int(1))],
            &max,
        );
        let centred = self.sub(&z, &max, &format!("{name}/centred"));
        let exp = self.unary("Exp", &centred, &format!("{name}/exp"));
        let sum = self.reduce_sum(&exp, &[1], &format!("{name}/sum"));
        let log_sum = self.unary("Log", &sum, &format!("{name}/log_sum"));
        self.sub(&centred, &log_sum, name)
    }

    /// Mean cross-entropy of `logits` [N, C] at int64 `labels` [N]: stable log-softmax,
    /// GatherElements at the labels, mean, negated.
    pub fn cross_entropy(&mut self, logits: &str, labels: &str, name: &str) -> String {
        let log_p = self.log_softmax(logits, 1.0, &format!("{name}/log_p"));
        let labels = self.unsqueeze(labels, &[1], &format!("{name}/labels_column"));
        let picked = self.op(
            "GatherElements",
            &[&log_p, &labels],
            vec![("axis", Attr::Int(1))],
            &format!("{name}/label_log_p"),
        );
        let mean = self.mean_all(&picked, &format!("{name}/mean_log_p"));
        self.unary("Neg", &mean, &format!("{name}/term"))
    }

    /// `x / max(||x||_2, 1e-12)` along `axis`.
    pub fn l2_normalize(&mut self, x: &str, axis: i64, name: &str) -> String {
        let norm = self.l2_norm(x, axis, &format!("{name}/norm"));
        self.div(x, &norm, name)
    }

    /// `sqrt(max(sum(x^2), 1e-24))` along `axis`, kept as a size-1 axis.
    pub fn l2_norm(&mut self, x: &str, axis: i64, name: &str) -> String {
        let squared = self.square(x, &format!("{name}/squared"));
        let sum = self.reduce_sum(&squared, &[axis], &format!("{name}/sum"));
        let floor = self.scalar(&format!("{name}/floor"), NORM_FLOOR_SQUARED);
        let floored = self.binary("Max", &sum, &floor, &format!("{name}/floored"));
        self.unary("Sqrt", &floored, name)
    }

    /// `N(flatten(mean over channels of x^2))`: the spatial attention map of AT, FT's factor.
    pub fn attention_map(&mut self, x: &str, name: &str) -> String {
        let squared = self.square(x, &format!("{name}/squared"));
        let channel_mean = self.reduce_mean(&squared, &[1], &format!("{name}/channel_mean"));
        let flat = self.unary("Flatten", &channel_mean, &format!("{name}/flat"));
        self.l2_normalize(&flat, 1, name)
    }

    /// Adaptive average pooling of an NCHW map from `from` to `to`: Reshape + ReduceMean when the
    /// sizes divide, else MatMul with a constant pooling matrix (AveragePool's gradient is broken
    /// on CPU with a symbolic batch).
    pub fn adaptive_pool(
        &mut self,
        x: &str,
        channels: i64,
        from: (i64, i64),
        to: (i64, i64),
        name: &str,
    ) -> String {
        let ((h, w), (oh, ow)) = (from, to);
        if h % oh == 0 && w % ow == 0 {
            let split = self.reshape(
                x,
                &[-1, channels, oh, h / oh, ow, w / ow],
                &format!("{name}/blocks"),
            );
            let pooled = self.reduce_mean(&split, &[3, 5], &format!("{name}/pooled"));
            return self.reshape(&pooled, &[-1, channels, oh, ow], name);
        }
        let flat = self.reshape(x, &[-1, channels, h * w], &format!("{name}/flat"));
        let matrix = pooling_matrix(from, to);
        let weights = self.const_f32(&format!("{name}/matrix"), &[h * w, oh * ow], &matrix);
        let pooled = self.matmul(&flat, &weights, &format!("{name}/pooled"));
        self.reshape(&pooled, &[-1, channels, oh, ow], name)
    }

    /// Smooth-L1 (beta 1) of `a - b`, element-wise: `0.5 q^2 + |d| - q` with `q = min(|d|, 1)`.
    pub fn smooth_l1(&mut self, a: &str, b: &str, name: &str) -> String {
        let d = self.sub(a, b, &format!("{name}/diff"));
        let abs = self.unary("Abs", &d, &format!("{name}/abs"));
        let one = self.scalar(&format!("{name}/one"), 1.0);
        let q = self.binary("Min", &abs, &one, &format!("{name}/q"));
        let q2 = self.square(&q, &format!("{name}/q2"));
        let half = self.scalar(&format!("{name}/half"), 0.5);
        let quadratic = self.mul(&q2, &half, &format!("{name}/quadratic"));
        let linear = self.sub(&abs, &q, &format!("{name}/linear"));
        self.add(&quadratic, &linear, name)
    }

    /// `x x^T` for a [B, D] matrix.
    pub fn batch_gram(&mut self, x: &str, name: &str) -> String {
        let xt = self.transpose(x, &[1, 0], &format!("{name}/xt"));
        self.matmul(x, &xt, name)
    }

    /// The mean of `(a - b)^2` over every element.
    /// `mean((a - b)^2)` over tensors of shape [B, *dims], reduced one axis at a time from
    /// the last, then over the batch: no float32 reduction runs over more than one axis's
    /// extent, so the mean keeps its precision on wide maps (a single ReduceMean over millions
    /// of elements drifts in onnxruntime).
    pub fn mse_staged(&mut self, a: &str, b: &str, dims: &[i64], name: &str) -> String {
        let d = self.sub(a, b, &format!("{name}/diff"));
        let mut x = self.square(&d, &format!("{name}/squared"));
        for axis in (1..=dims.len() as i64).rev() {
            let axes = self.const_i64(&format!("{name}/axis{axis}"), &[1], &[axis]);
            x = self.op(
                "ReduceSum",
                &[&x, &axes],
                // Kept as size-1 axes: ORT's gradient of a reduction that drops axes fails.
                vec![("keepdims", super::builder::Attr::Int(1))],
                &format!("{name}/sum{axis}"),
            );
        }
        let mean = self.mean_all(&x, &format!("{name}/batch_mean"));
        let count = self.scalar(
            &format!("{name}/count"),
            dims.iter().product::<i64>() as f32,
        );
        self.div(&mean, &count, name)
    }

    pub fn mse(&mut self, a: &str, b: &str, name: &str) -> String {
        let d = self.sub(a, b, &format!("{name}/diff"));
        let d2 = self.square(&d, &format!("{name}/squared"));
        self.mean_all(&d2, name)
    }

    /// The batch size of `x` (axis 0) as a float scalar.
    pub fn batch_size(&mut self, x: &str, name: &str) -> String {
        let shape = self.unary("Shape", x, &format!("{name}/shape"));
        let zero = self.const_i64(&format!("{name}/axis"), &[], &[0]);
        let b = self.op(
            "Gather",
            &[&shape, &zero],
            vec![("axis", Attr::Int(0))],
            &format!("{name}/int"),
        );
        self.op("Cast", &[&b], vec![("to", Attr::Int(1))], name)
    }

    /// `softplus(x) = relu(x) + log(1 + exp(-|x|))` (ORT has no Softplus gradient; tract's overflows).
    pub fn softplus(&mut self, x: &str, name: &str) -> String {
        let relu = self.unary("Relu", x, &format!("{name}/relu"));
        let abs = self.unary("Abs", x, &format!("{name}/abs"));
        let neg = self.unary("Neg", &abs, &format!("{name}/neg_abs"));
        let exp = self.unary("Exp", &neg, &format!("{name}/exp"));
        let one = self.scalar(&format!("{name}/one"), 1.0);
        let shifted = self.add(&exp, &one, &format!("{name}/one_plus"));
        let log = self.unary("Log", &shifted, &format!("{name}/log"));
        self.add(&relu, &log, name)
    }

    /// The value of a positive tensor with its gradient stopped: `log x` scaled by 2^24 goes
    /// through int64 (integer tensors carry no gradient) and back, which is exact to 2^-24 in
    /// `log x` (a relative 6e-8 in x, below float32's own rounding). ONNX has no stop-gradient op.
    pub fn detach_positive(&mut self, x: &str, name: &str) -> String {
        let log = self.unary("Log", x, &format!("{name}/log"));
        let up = self.scalar(&format!("{name}/scale"), DETACH_SCALE);
        let scaled = self.mul(&log, &up, &format!("{name}/scaled"));
        let int = self.op(
            "Cast",
            &[&scaled],
            vec![("to", Attr::Int(7))],
            &format!("{name}/as_int64"),
        );
        let back = self.op(
            "Cast",
            &[&int],
            vec![("to", Attr::Int(1))],
            &format!("{name}/as_float"),
        );
        let down = self.scalar(&format!("{name}/unscale"), 1.0 / DETACH_SCALE);
        let unscaled = self.mul(&back, &down, &format!("{name}/unscaled"));
        self.unary("Exp", &unscaled, name)
    }

    /// A float mask (1.0 where `condition` holds); it carries no gradient.
    pub fn mask(&mut self, condition: &str, name: &str) -> String {
        self.op("Cast", &[condition], vec![("to", Attr::Int(1))], name)
    }

    /// The sum of several scalars (chained Add: Sum has no gradient in ORT).
    pub fn sum_of(&mut self, terms: &[String], name: &str) -> String {
        let Some(first) = terms.first() else {
            // The empty sum.
            let zero = self.scalar(&format!("{name}/zero"), 0.0);
            return self.unary("Identity", &zero, name);
        };
        let mut total = first.clone();
        for (i, term) in terms.iter().enumerate().skip(1) {
            let step = if i + 1 == terms.len() {
                name.to_string()
            } else {
                format!("{name}/partial{i}")
            };
            total = self.add(&total, term, &step);
        }
        if terms.len() == 1 {
            return self.unary("Identity", &total, name);
        }
        total
    }
}

/// The (h*w) x (oh*ow) matrix of adaptive average pooling (PyTorch's bins: floor/ceil edges).
fn pooling_matrix((h, w): (i64, i64), (oh, ow): (i64, i64)) -> Vec<f32> {
    let bins = |size: i64, out: i64| -> Vec<(i64, i64)> {
        (0..out)
            .map(|i| ((i * size) / out, ((i + 1) * size + out - 1) / out))
            .collect()
    };
    let (rows, cols) = (bins(h, oh), bins(w, ow));
    let mut m = vec![0f32; (h * w * oh * ow) as usize];
    for (oi, &(r0, r1)) in rows.iter().enumerate() {
        for (oj, &(c0, c1)) in cols.iter().enumerate() {
            let weight = 1.0 / ((r1 - r0) * (c1 - c0)) as f32;
            for r in r0..r1 {
                for c in c0..c1 {
                    m[((r * w + c) * oh * ow) as usize + oi * ow as usize + oj] = weight;
                }
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_matrix_averages_each_bin() {
        // 3 -> 2 along one axis: bins [0, 2) and [1, 3), as torch's adaptive pooling.
        let m = pooling_matrix((3, 1), (2, 1));
        assert_eq!(m, vec![0.5, 0.0, 0.5, 0.5, 0.0, 0.5]);
    }
}
