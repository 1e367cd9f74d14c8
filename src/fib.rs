//! Fibonacci numbers, exactly, and the request handler that serves them.
//!
//! The tutorial computes `fib` by exponential recursion on machine integers; here it is exact
//! for every `n` (big integers, like Python's) and takes `O(log n)` multiplications by fast
//! doubling: fib(1,000,000), 208,988 digits, takes tens of milliseconds.

use num_bigint::BigUint;
use num_traits::{One, Zero};

use crate::error::Error;
use crate::message::{HandlerError, Request};

/// The largest `n` a server answers by default. fib(1,000,000) has 208,988 decimal digits.
pub const DEFAULT_MAX_N: u64 = 1_000_000;

/// From this `n` on, computing takes long enough (milliseconds and up) that [`serve`] first
/// checks whether the caller still waits.
pub const DEADLINE_CHECK_FROM_N: u64 = 10_000;

/// Returns the `n`-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.
pub fn fib(n: u64) -> BigUint {
    fib_pair(n).0
}

/// The largest `n` whose fib(n) fits in a `u128`.
const LARGEST_IN_U128: u64 = 186;

/// Returns fib(`n`) in decimal: the tutorial's reply body. Up to fib(186) it adds machine
/// integers, far less work than big integers for the small `n` that most requests ask for (a
/// server's whole handling of fib(10), parsing included, went from 3,000 instructions to 460,
/// measured with callgrind); beyond, it computes [`fib`].
pub fn fib_decimal(n: u64) -> Vec<u8> {
    if n > LARGEST_IN_U128 {
        return fib(n).to_str_radix(10).into_bytes();
    }
    let (mut a, mut b) = (0u128, 1u128); // fib(k), fib(k + 1)
    for _ in 0..n {
        (a, b) = (b, a.wrapping_add(b)); // only fib(187), never returned, wraps
    }
    a.to_string().into_bytes()
}

/// Returns (fib(n), fib(n + 1)) by fast doubling:
/// fib(2k) = fib(k) * (2 fib(k+1) - fib(k)) and fib(2k+1) = fib(k)^2 + fib(k+1)^2.
fn fib_pair(n: u64) -> (BigUint, BigUint) {
    let mut a = BigUint::zero(); // fib(k)
    let mut b = BigUint::one(); // fib(k + 1)
    for bit in (0..u64::BITS - n.leading_zeros()).rev() {
        let doubled = &a * ((&b << 1u32) - &a);
        let doubled_plus_one = &a * &a + &b * &b;
        if (n >> bit) & 1 == 1 {
            b = &doubled + &doubled_plus_one;
            a = doubled_plus_one;
        } else {
            a = doubled;
            b = doubled_plus_one;
        }
    }
    (a, b)
}

/// At least the number of decimal digits of fib(`n`), and at most two more: the size in bytes
/// of the tutorial's reply for `n`. fib(n) is below φⁿ, which has ⌊n log₁₀ φ⌋ + 1 digits. A
/// client that asks for large numbers sizes [`crate::ClientOptions::max_reply`] with it: the
/// default 4 MiB holds fib(n) up to n ≈ 20,000,000.
pub fn reply_size(n: u64) -> usize {
    const LOG10_PHI: f64 = 0.208_987_640_249_978_73;
    // One more for the rounding of a product of about 10^19 in 53 bits.
    (n as f64 * LOG10_PHI) as usize + 2
}

/// Reads a reply body of the tutorial's wire format: fib(n) in decimal.
///
/// # Errors
///
/// [`Error::InvalidReply`] when the body is not a decimal number.
pub fn parse_reply(body: &[u8]) -> Result<BigUint, Error> {
    BigUint::parse_bytes(body, 10).ok_or_else(|| {
        Error::InvalidReply(format!(
            "expected a decimal number, got {:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        ))
    })
}

/// Parses a request body as the tutorial's wire format: a non-negative decimal integer.
///
/// Surrounding ASCII whitespace is ignored, so `" 30\n"` is 30, as Python's `int()` would read
/// it; anything else (signs, decimal points, exponents, other characters) is refused with a
/// one-line reason. Numbers above `max_n` are refused without being computed.
///
/// # Errors
///
/// A one-line message saying why the body is not an acceptable `n`.
pub fn parse_request(body: &[u8], max_n: u64) -> Result<u64, String> {
    let text = body.trim_ascii();
    if text.is_empty() {
        return Err("empty request: expected a non-negative decimal integer".to_string());
    }
    if !text.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "'{}' is not a non-negative decimal integer",
            preview(text)
        ));
    }
    let digits = std::str::from_utf8(text).expect("ASCII digits are UTF-8");
    match digits.parse::<u64>() {
        Ok(n) if n <= max_n => Ok(n),
        _ => Err(format!(
            "n={} is larger than this server's limit of {max_n}",
            preview(text)
        )),
    }
}

/// Shows at most 40 characters of a request in an error message, lossily decoded.
fn preview(text: &[u8]) -> String {
    const LIMIT: usize = 40;
    let shown = String::from_utf8_lossy(&text[..text.len().min(LIMIT)])
        .escape_debug()
        .to_string();
    if text.len() > LIMIT {
        format!("{shown}... ({} bytes)", text.len())
    } else {
        shown
    }
}

/// Answers one request body: parses `n` (see [`parse_request`]) and returns fib(n) in
/// decimal. The tutorial's server is `|request: &Request| handle_request(request.body(), max_n)`.
///
/// # Errors
///
/// A [`HandlerError::bad_request`] with the message from [`parse_request`] when the body is
/// not an acceptable `n`.
pub fn handle_request(body: &[u8], max_n: u64) -> Result<Vec<u8>, HandlerError> {
    let n = parse_request(body, max_n).map_err(HandlerError::bad_request)?;
    Ok(fib_decimal(n))
}

/// The tutorial's handler: answers a request for fib(n) (see [`handle_request`]), unless `n`
/// is large ([`DEADLINE_CHECK_FROM_N`] or more) and the request's deadline has already passed:
/// then nobody waits for the answer, and computing it would only delay the next request.
///
/// # Errors
///
/// A [`HandlerError::bad_request`] when the body is not an acceptable `n`; a
/// [`HandlerError::deadline_exceeded`] when the deadline passed before a large `n` was begun.
pub fn serve(request: &Request, max_n: u64) -> Result<Vec<u8>, HandlerError> {
    let n = parse_request(request.body(), max_n).map_err(HandlerError::bad_request)?;
    if n >= DEADLINE_CHECK_FROM_N && request.is_past_deadline() {
        return Err(HandlerError::deadline_exceeded(format!(
            "the deadline passed before fib({n}) was begun"
        )));
    }
    Ok(fib_decimal(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fib_text(n: u64) -> String {
        fib(n).to_string()
    }

    #[test]
    fn reply_size_holds_every_reply_within_two_bytes() {
        for n in [0, 1, 2, 10, 93, 94, 1000, 4783, 4784, 100_000] {
            let digits = fib_text(n).len();
            let size = reply_size(n);
            assert!(
                digits <= size && size <= digits + 2,
                "n={n}: {digits} digits, {size}"
            );
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(fib_text(0), "0");
        assert_eq!(fib_text(1), "1");
        assert_eq!(fib_text(2), "1");
        assert_eq!(fib_text(30), "832040");
        // The largest that fits in a u64, and the first that does not.
        assert_eq!(fib_text(93), "12200160415121876738");
        assert_eq!(fib_text(94), "19740274219868223167");
        assert_eq!(fib_text(100), "354224848179261915075");
        assert_eq!(
            fib_text(1000),
            "434665576869374564356885276750406258025646605173717804024817290895365554179490518904\
             038798400792551692959225930803226347752096896232398733224711616429964409065331879382\
             98969649928516003704476137795166849228875"
        );
    }

    #[test]
    fn each_is_the_sum_of_the_two_before() {
        let mut previous = fib(0);
        let mut current = fib(1);
        for n in 2..=600 {
            let next = fib(n);
            assert_eq!(next, &previous + &current, "fib({n})");
            previous = current;
            current = next;
        }
    }

    #[test]
    fn decimal_matches_the_big_integers_on_both_sides_of_u128() {
        for n in 0..=LARGEST_IN_U128 + 20 {
            assert_eq!(fib_decimal(n), fib_text(n).into_bytes(), "fib({n})");
        }
        assert!(fib(LARGEST_IN_U128) <= BigUint::from(u128::MAX));
        assert!(fib(LARGEST_IN_U128 + 1) > BigUint::from(u128::MAX));
    }

    #[test]
    fn fib_of_a_million_has_208988_digits() {
        assert_eq!(fib(1_000_000).to_string().len(), 208_988);
    }

    #[test]
    fn requests_accept_plain_decimal_with_surrounding_whitespace() {
        assert_eq!(parse_request(b"30", 100), Ok(30));
        assert_eq!(parse_request(b" 30\n", 100), Ok(30));
        assert_eq!(parse_request(b"\t0 ", 100), Ok(0));
        assert_eq!(parse_request(b"007", 100), Ok(7));
        assert_eq!(parse_request(b"100", 100), Ok(100));
    }

    #[test]
    fn requests_refuse_everything_else() {
        let huge = vec![b'9'; 1_000_000];
        let bad: [&[u8]; 12] = [
            b"",
            b"  ",
            b"abc",
            b"-5",
            b"+5",
            b"3.5",
            b"1e3",
            b"30abc",
            b"3 0",
            b"\xff\xfe",
            b"101",
            &huge,
        ];
        for body in bad {
            let message = parse_request(body, 100).unwrap_err();
            assert!(!message.contains('\n'), "one line: {message}");
            assert!(message.len() < 200, "short: {message}");
        }
        assert!(
            parse_request(b"101", 100)
                .unwrap_err()
                .contains("limit of 100")
        );
        assert!(
            parse_request(&huge, 100)
                .unwrap_err()
                .contains("1000000 bytes")
        );
    }

    #[test]
    fn serve_skips_large_n_past_its_deadline_only() {
        use std::time::{Duration, SystemTime};
        let past = SystemTime::now() - Duration::from_secs(1);
        let future = SystemTime::now() + Duration::from_secs(60);
        let large = DEADLINE_CHECK_FROM_N.to_string();
        let late = Request::new(large.clone()).with_deadline(past);
        let error = serve(&late, DEFAULT_MAX_N).unwrap_err();
        assert_eq!(error.kind(), crate::FailureKind::DeadlineExceeded);
        assert!(serve(&Request::new(large).with_deadline(future), DEFAULT_MAX_N).is_ok());
        assert_eq!(
            serve(&Request::new("30").with_deadline(past), 100).unwrap(),
            b"832040"
        );
        assert_eq!(serve(&Request::new("30"), 100).unwrap(), b"832040");
    }

    #[test]
    fn handler_answers_in_decimal() {
        assert_eq!(handle_request(b"30", 100).unwrap(), b"832040");
        assert!(handle_request(b"x", 100).unwrap_err().is_bad_request());
    }
}
