//! Optimisers with checkpointable state (feature `nn`): SGD with Nesterov momentum (the SimNet
//! and MLP papers' choice) and Adam (the fused paper's). The training jobs save
//! [`Optimiser::state`] with every checkpoint so that a resumed job continues exactly.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::PluginError;

/// An optimiser over a fixed list of parameters (in the stable order of
/// [`crate::Trainable::vars`]).
pub trait Optimiser: Send + std::fmt::Debug {
    /// One update from `grads`; parameters without a gradient are left alone.
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()>;

    /// Backpropagates `loss` and takes one step.
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The current learning rate.
    fn learning_rate(&self) -> f64;

    /// Sets the learning rate (decay schedules).
    fn set_learning_rate(&mut self, lr: f64);

    /// The optimiser's buffers as safetensors bytes.
    fn state(&self) -> Result<Vec<u8>, PluginError>;

    /// Restores buffers written by [`Optimiser::state`] for the same parameter list.
    fn load_state(&mut self, bytes: &[u8]) -> Result<(), PluginError>;
}

fn save(buffers: Vec<(String, Tensor)>) -> Result<Vec<u8>, PluginError> {
    safetensors::serialize(buffers.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| PluginError::Weights(format!("cannot write optimiser state: {e}")))
}

/// Reads the buffer `name` for parameter `i` of `vars`, checking its shape.
fn restore(
    map: &std::collections::HashMap<String, Tensor>,
    name: &str,
    var: &Var,
) -> Result<Option<Tensor>, PluginError> {
    match map.get(name) {
        None => Ok(None),
        Some(t) if t.dims() == var.dims() => Ok(Some(t.clone())),
        Some(t) => Err(PluginError::Weights(format!(
            "optimiser buffer {name} has shape {:?}, the parameter {:?}",
            t.dims(),
            var.dims()
        ))),
    }
}

/// Stochastic gradient descent with Nesterov momentum (Sutskever et al. 2013), as PyTorch's
/// `SGD(nesterov=True)`: `v = mu * v + g; p -= lr * (g + mu * v)`, with optional weight decay
/// added to `g`.
#[derive(Debug)]
pub struct SgdNesterov {
    vars: Vec<(Var, Option<Tensor>)>,
    /// Learning rate.
    pub lr: f64,
    /// Momentum `mu`.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
}

impl SgdNesterov {
    /// An optimiser over `vars`.
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        SgdNesterov {
            vars: vars.into_iter().map(|v| (v, None)).collect(),
            lr,
            momentum,
            weight_decay,
        }
    }
}

impl Optimiser for SgdNesterov {
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for (var, velocity) in &mut self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a leaf variable's gradient can still carry the ops that computed it, and
            // a buffer derived from it would keep that graph, and each step's buffer the last
            // one's, alive (memory grew by gigabytes within minutes with weight decay). So is
            // the decay term computed from the variable. Adam's step does the same.
            let g = g.detach();
            let g = if self.weight_decay != 0.0 {
                (g + (var.as_tensor().detach() * self.weight_decay)?)?
            } else {
                g
            };
            let v = match velocity.take() {
                Some(v) => ((v * self.momentum)? + &g)?,
                None => g.clone(),
            };
            let update = (&g + (&v * self.momentum)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *velocity = Some(v);
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn state(&self) -> Result<Vec<u8>, PluginError> {
        save(
            self.vars
                .iter()
                .enumerate()
                .filter_map(|(i, (_, v))| v.as_ref().map(|v| (format!("{i}.velocity"), v.clone())))
                .collect(),
        )
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), PluginError> {
        let map = crate::nn::read_safetensors(bytes)?;
        for (i, (var, velocity)) in self.vars.iter_mut().enumerate() {
            *velocity = restore(&map, &format!("{i}.velocity"), var)?;
        }
        Ok(())
    }
}

/// Adam (Kingma and Ba 2015) with bias correction, as PyTorch's `Adam` without weight decay.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(Var, Option<(Tensor, Tensor)>)>,
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    /// Adam over `vars` with `lr` and the usual betas (0.9, 0.999) and eps 1e-8.
    pub fn new(vars: Vec<Var>, lr: f64) -> Self {
        Adam {
            vars: vars.into_iter().map(|v| (v, None)).collect(),
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
        }
    }
}

impl Optimiser for Adam {
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let c1 = 1.0 - self.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.beta2.powi(self.t as i32);
        for (var, moments) in &mut self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = &g.detach(); // See SgdNesterov::step.
            let (m, v) = match moments.take() {
                Some((m, v)) => (
                    ((m * self.beta1)? + (g * (1.0 - self.beta1))?)?,
                    ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?,
                ),
                None => ((g * (1.0 - self.beta1))?, (g.sqr()? * (1.0 - self.beta2))?),
            };
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            *moments = Some((m, v));
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn state(&self) -> Result<Vec<u8>, PluginError> {
        let mut buffers = vec![(
            "t".to_string(),
            Tensor::new(&[self.t as f32], &candle_core::Device::Cpu)?,
        )];
        for (i, (_, mv)) in self.vars.iter().enumerate() {
            if let Some((m, v)) = mv {
                buffers.push((format!("{i}.m"), m.clone()));
                buffers.push((format!("{i}.v"), v.clone()));
            }
        }
        save(buffers)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<(), PluginError> {
        let map = crate::nn::read_safetensors(bytes)?;
        self.t = match map.get("t") {
            Some(t) => t.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) as u64,
            None => 0,
        };
        for (i, (var, mv)) in self.vars.iter_mut().enumerate() {
            let m = restore(&map, &format!("{i}.m"), var)?;
            let v = restore(&map, &format!("{i}.v"), var)?;
            *mv = m.zip(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Minimises (x - 3)^2 and checks that state round trips give identical continuations.
    fn converges_and_resumes(make: impl Fn(Vec<Var>) -> Box<dyn Optimiser>) {
        let x = Var::new(&[0f32], &Device::Cpu).unwrap();
        let mut opt = make(vec![x.clone()]);
        let loss = |x: &Var| {
            (x.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        for _ in 0..5 {
            opt.backward_step(&loss(&x)).unwrap();
        }
        let state = opt.state().unwrap();
        let at = x.as_tensor().to_vec1::<f32>().unwrap();
        for _ in 0..300 {
            opt.backward_step(&loss(&x)).unwrap();
        }
        let end = x.as_tensor().to_vec1::<f32>().unwrap();
        assert!((end[0] - 3.0).abs() < 0.05, "ended at {end:?}");
        // Restore the state after 5 steps into a fresh optimiser: the same 300 steps follow.
        let y = Var::new(at.as_slice(), &Device::Cpu).unwrap();
        let mut again = make(vec![y.clone()]);
        again.load_state(&state).unwrap();
        for _ in 0..300 {
            again.backward_step(&loss(&y)).unwrap();
        }
        assert_eq!(y.as_tensor().to_vec1::<f32>().unwrap(), end);
    }

    #[test]
    fn sgd_nesterov_converges_and_resumes_exactly() {
        converges_and_resumes(|v| Box::new(SgdNesterov::new(v, 0.05, 0.9, 0.0)));
    }

    #[test]
    fn optimiser_buffers_keep_no_graph_between_steps() {
        let x = Var::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = SgdNesterov::new(vec![x.clone()], 0.05, 0.9, 5e-4);
        for _ in 0..3 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
        }
        // A velocity that tracked ops would hold every earlier step's tensors.
        let velocity = opt.vars[0].1.as_ref().unwrap();
        assert!(!velocity.track_op());
        let mut adam = Adam::new(vec![x.clone()], 0.05);
        for _ in 0..3 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            adam.backward_step(&loss).unwrap();
        }
        let (m, v) = adam.vars[0].1.as_ref().unwrap();
        assert!(!m.track_op() && !v.track_op());
    }

    #[test]
    fn adam_converges_and_resumes_exactly() {
        converges_and_resumes(|v| Box::new(Adam::new(v, 0.05)));
    }
}
