//! Small dense f64 linear algebra on the host for the instant seal: Gram accumulation,
//! Cholesky solves, Gram–Schmidt and a Jacobi eigensolver for small symmetric matrices.
//! Matrices are row-major. Big products stay on the model's device (f32); what needs f64
//! (sums of thousands of outer products, solves with a small ridge) happens here.

use seal_sd::rng::SeededRng;

#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    pub fn identity(n: usize) -> Self {
        Self::diagonal(&vec![1.0; n])
    }

    pub fn diagonal(values: &[f64]) -> Self {
        let n = values.len();
        let mut m = Self::zeros(n, n);
        values.iter().enumerate().for_each(|(i, &v)| m.data[i * n + i] = v);
        m
    }

    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data");
        Self { rows, cols, data: data.iter().map(|&x| x as f64).collect() }
    }

    /// Standard normal entries from `rng` (for randomized range finding).
    pub fn gaussian(rows: usize, cols: usize, rng: &mut SeededRng) -> Self {
        Self::from_f32(rows, cols, &rng.normals(rows * cols))
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.at(i, j);
            }
        }
        t
    }

    pub fn matmul(&self, other: &Mat) -> Self {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = Self::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let dst = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for (k, &a) in self.row(i).iter().enumerate() {
                if a != 0.0 {
                    dst.iter_mut().zip(other.row(k)).for_each(|(d, &b)| *d += a * b);
                }
            }
        }
        out
    }

    pub fn scale(mut self, s: f64) -> Self {
        self.data.iter_mut().for_each(|x| *x *= s);
        self
    }

    /// `self + s * other`.
    pub fn add_scaled(mut self, other: &Mat, s: f64) -> Self {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols), "add shapes");
        self.data.iter_mut().zip(&other.data).for_each(|(a, &b)| *a += s * b);
        self
    }

    pub fn trace(&self) -> f64 {
        (0..self.rows.min(self.cols)).map(|i| self.at(i, i)).sum()
    }

    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// Columns `0..n`.
    pub fn first_cols(&self, n: usize) -> Self {
        let mut out = Self::zeros(self.rows, n);
        for i in 0..self.rows {
            out.data[i * n..(i + 1) * n].copy_from_slice(&self.row(i)[..n]);
        }
        out
    }
}

/// Adds `Σ a_r b_rᵀ` over paired rows (`a`, `b`: row-major, `d` wide) to `acc` (`d x d`).
/// With `a == b` this is the Gram matrix; only then is symmetry used (half the work).
pub fn add_outer(acc: &mut Mat, a: &[f64], b: &[f64], d: usize) {
    let symmetric = std::ptr::eq(a, b);
    for (ra, rb) in a.chunks_exact(d).zip(b.chunks_exact(d)) {
        for (i, &x) in ra.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            let from = if symmetric { i } else { 0 };
            acc.data[i * d + from..(i + 1) * d].iter_mut().zip(&rb[from..]).for_each(|(g, &y)| *g += x * y);
        }
    }
}

/// Mirrors the upper triangle (as `add_outer` fills a Gram matrix) into the lower one.
pub fn symmetrize_upper(m: &mut Mat) {
    for i in 0..m.rows {
        for j in 0..i {
            m.data[i * m.cols + j] = m.data[j * m.cols + i];
        }
    }
}

/// The lower Cholesky factor `L` of a symmetric positive definite `a` (`a = L Lᵀ`).
pub fn cholesky(a: &Mat) -> Result<Mat, String> {
    let n = a.rows;
    let mut l = Mat::zeros(n, n);
    for j in 0..n {
        let mut diag = a.at(j, j);
        for k in 0..j {
            diag -= l.at(j, k).powi(2);
        }
        if !(diag > 0.0 && diag.is_finite()) {
            return Err(format!("the system is not positive definite (pivot {j} is {diag:e})"));
        }
        let djj = diag.sqrt();
        l.data[j * n + j] = djj;
        for i in j + 1..n {
            let dot: f64 = (0..j).map(|k| l.at(i, k) * l.at(j, k)).sum();
            l.data[i * n + j] = (a.at(i, j) - dot) / djj;
        }
    }
    Ok(l)
}

/// `X` with `L X = B` (`L` lower triangular).
pub fn solve_lower(l: &Mat, b: &Mat) -> Mat {
    let (n, m) = (l.rows, b.cols);
    let mut x = b.clone();
    for i in 0..n {
        for k in 0..i {
            let lik = l.at(i, k);
            if lik != 0.0 {
                for j in 0..m {
                    x.data[i * m + j] -= lik * x.data[k * m + j];
                }
            }
        }
        let d = l.at(i, i);
        x.data[i * m..(i + 1) * m].iter_mut().for_each(|v| *v /= d);
    }
    x
}

/// `X` with `Lᵀ X = B` (`L` lower triangular).
pub fn solve_lower_transposed(l: &Mat, b: &Mat) -> Mat {
    let (n, m) = (l.rows, b.cols);
    let mut x = b.clone();
    for i in (0..n).rev() {
        for k in i + 1..n {
            let lki = l.at(k, i);
            if lki != 0.0 {
                for j in 0..m {
                    x.data[i * m + j] -= lki * x.data[k * m + j];
                }
            }
        }
        let d = l.at(i, i);
        x.data[i * m..(i + 1) * m].iter_mut().for_each(|v| *v /= d);
    }
    x
}

/// `X` with `A X = B` for `A = L Lᵀ`.
pub fn cholesky_solve(l: &Mat, b: &Mat) -> Mat {
    solve_lower_transposed(l, &solve_lower(l, b))
}

/// An orthonormal basis of the columns of `y` (modified Gram–Schmidt, twice for stability);
/// columns that add no new direction are dropped.
pub fn orthonormal_columns(y: &Mat) -> Mat {
    let (n, k) = (y.rows, y.cols);
    let t = y.transpose();
    let scale = t.data.chunks_exact(n).map(|c| c.iter().map(|x| x * x).sum::<f64>().sqrt()).fold(0.0, f64::max);
    let mut basis: Vec<Vec<f64>> = vec![];
    for col in t.data.chunks_exact(n) {
        let mut v = col.to_vec();
        for _ in 0..2 {
            for q in &basis {
                let dot: f64 = v.iter().zip(q).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(q).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-10 * scale.max(f64::MIN_POSITIVE) && basis.len() < k {
            v.iter_mut().for_each(|x| *x /= norm);
            basis.push(v);
        }
    }
    let r = basis.len();
    let flat: Vec<f64> = basis.into_iter().flatten().collect();
    Mat { rows: r, cols: n, data: flat }.transpose()
}

/// Eigenvalues (descending) and eigenvectors (as columns, in the same order) of a small
/// symmetric matrix, by cyclic Jacobi rotations.
pub fn symmetric_eigen(a: &Mat) -> (Vec<f64>, Mat) {
    let n = a.rows;
    let mut m = a.clone();
    let mut v = Mat::identity(n);
    let norm = m.frobenius().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| m.at(i, j).powi(2)).sum();
        if off.sqrt() <= 1e-14 * norm {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m.at(p, q);
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (m.at(q, q) - m.at(p, p)) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (mkp, mkq) = (m.at(k, p), m.at(k, q));
                    m.data[k * n + p] = c * mkp - s * mkq;
                    m.data[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m.at(p, k), m.at(q, k));
                    m.data[p * n + k] = c * mpk - s * mqk;
                    m.data[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.data[k * n + p] = c * vkp - s * vkq;
                    v.data[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m.at(j, j).total_cmp(&m.at(i, i)));
    let values = order.iter().map(|&i| m.at(i, i)).collect();
    let mut vectors = Mat::zeros(n, n);
    for (new, &old) in order.iter().enumerate() {
        for k in 0..n {
            vectors.data[k * n + new] = v.at(k, old);
        }
    }
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        Mat::gaussian(rows, cols, &mut SeededRng::new(seed))
    }

    fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
        a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn gram_and_cross_products_equal_matrix_products() {
        let (a, b) = (random(9, 5, 1), random(9, 5, 2));
        let mut gram = Mat::zeros(5, 5);
        add_outer(&mut gram, &a.data, &a.data, 5);
        symmetrize_upper(&mut gram);
        assert!(max_abs_diff(&gram, &a.transpose().matmul(&a)) < 1e-12);
        let mut cross = Mat::zeros(5, 5);
        add_outer(&mut cross, &a.data, &b.data, 5);
        assert!(max_abs_diff(&cross, &a.transpose().matmul(&b)) < 1e-12);
    }

    #[test]
    fn cholesky_solves_spd_systems() {
        let x = random(12, 6, 3);
        let a = x.transpose().matmul(&x).add_scaled(&Mat::identity(6), 0.5);
        let b = random(6, 3, 4);
        let l = cholesky(&a).unwrap();
        assert!(max_abs_diff(&l.matmul(&l.transpose()), &a) < 1e-10);
        assert!(max_abs_diff(&a.matmul(&cholesky_solve(&l, &b)), &b) < 1e-10);
        assert!(cholesky(&Mat::zeros(2, 2)).is_err());
    }

    #[test]
    fn gram_schmidt_and_jacobi() {
        let y = random(10, 4, 5);
        let q = orthonormal_columns(&y);
        assert_eq!((q.rows, q.cols), (10, 4));
        assert!(max_abs_diff(&q.transpose().matmul(&q), &Mat::identity(4)) < 1e-12);
        // A repeated column adds no direction.
        let mut twice = y.first_cols(2);
        twice = Mat { rows: 10, cols: 3, data: (0..10).flat_map(|i| [twice.at(i, 0), twice.at(i, 1), twice.at(i, 0)]).collect() };
        assert_eq!(orthonormal_columns(&twice).cols, 2);

        let x = random(7, 5, 6);
        let s = x.transpose().matmul(&x);
        let (values, vectors) = symmetric_eigen(&s);
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
        let lambda = Mat { rows: 5, cols: 5, data: (0..25).map(|k| if k % 6 == 0 { values[k / 6] } else { 0.0 }).collect() };
        let back = vectors.matmul(&lambda).matmul(&vectors.transpose());
        assert!(max_abs_diff(&back, &s) < 1e-9);
    }
}
