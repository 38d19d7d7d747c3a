//! The MLX backend (feature `mlx`).

mod sys;
