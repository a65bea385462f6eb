//! Descriptive statistics of masks: what the reference comparison and `beit-cli mask` report.

/// Number of masked cells.
pub fn masked_count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&b| b).count()
}

/// Number of 4-connected groups of masked cells in a row-major `height × width` mask.
pub fn connected_components(mask: &[bool], height: usize, width: usize) -> usize {
    let mut seen = vec![false; mask.len()];
    let mut stack = Vec::new();
    let mut groups = 0;
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        groups += 1;
        seen[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (r, c) = (i / width, i % width);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if r > 0 {
                visit(i - width);
            }
            if r + 1 < height {
                visit(i + width);
            }
            if c > 0 {
                visit(i - 1);
            }
            if c + 1 < width {
                visit(i + 1);
            }
        }
    }
    groups
}

/// Whether cell `i` of a `height × width` grid lies on the outer ring.
pub fn is_border(i: usize, height: usize, width: usize) -> bool {
    let (r, c) = (i / width, i % width);
    r == 0 || c == 0 || r + 1 == height || c + 1 == width
}

/// Share of the border cells (outer ring) that are masked, and share of the inner cells that are
/// masked. The inner share is 0 for grids without inner cells.
pub fn border_inner_fractions(mask: &[bool], height: usize, width: usize) -> (f64, f64) {
    let (mut border, mut border_hit, mut inner, mut inner_hit) = (0usize, 0usize, 0usize, 0usize);
    for (i, &m) in mask.iter().enumerate() {
        if is_border(i, height, width) {
            border += 1;
            border_hit += usize::from(m);
        } else {
            inner += 1;
            inner_hit += usize::from(m);
        }
    }
    let frac = |hit: usize, all: usize| {
        if all == 0 {
            0.0
        } else {
            hit as f64 / all as f64
        }
    };
    (frac(border_hit, border), frac(inner_hit, inner))
}

/// Render a mask as text: `#` masked, `.` visible, one grid row per line.
pub fn render_ascii(mask: &[bool], height: usize, width: usize) -> String {
    let mut out = String::with_capacity(height * (width + 1));
    for r in 0..height {
        for c in 0..width {
            out.push(if mask[r * width + c] { '#' } else { '.' });
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_and_fractions_on_a_known_mask() {
        // 4x4:  # # . .
        //       . . . #
        //       . # . #
        //       . . . .
        let m: Vec<bool> = "##.....#.#.#....".chars().map(|c| c == '#').collect();
        assert_eq!(masked_count(&m), 5);
        assert_eq!(connected_components(&m, 4, 4), 3);
        // Border: 12 cells, masked (0,0),(0,1),(1,3),(2,3) = 4; inner: 4 cells, masked (2,1) = 1.
        let (b, i) = border_inner_fractions(&m, 4, 4);
        assert!((b - 4.0 / 12.0).abs() < 1e-12);
        assert!((i - 0.25).abs() < 1e-12);
        assert_eq!(render_ascii(&m, 4, 4), "##..\n...#\n.#.#\n....\n");
    }
}
