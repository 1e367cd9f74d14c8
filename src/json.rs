//! Typed JSON payloads, with serde (cargo feature `json`, on by default).
//!
//! A client sends any `Serialize` value and reads the reply as any `DeserializeOwned` type
//! ([`Client::call_json`], or [`Call::json`] with [`Reply::json`] to add headers); a server
//! serves a typed function with [`handler`]. JSON bodies carry the content type
//! `application/json`.
//!
//! A request that does not decode is answered with a `bad-request` error reply that says what
//! was wrong; the worker goes on serving. A reply that does not decode is the caller's
//! [`Error::InvalidReply`], distinct from the server's own errors ([`Error::Remote`]).

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::message::{Call, HandlerError, Reply, Request};
use crate::service::Handler;
use crate::wire::JSON_CONTENT_TYPE;

impl Call {
    /// A call whose body is `value` as JSON, with content type `application/json`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] when `value` cannot be represented in JSON (a map whose keys
    /// are not strings, say).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Call> {
        let body = serde_json::to_vec(value).map_err(|e| {
            Error::InvalidRequest(format!("cannot encode the request as JSON: {e}"))
        })?;
        Ok(Call::new(body).with_content_type(JSON_CONTENT_TYPE))
    }
}

impl Reply {
    /// Decodes the body as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidReply`] when the body is not JSON of the shape `T` expects.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::InvalidReply(format!("the reply is not the JSON expected: {e}")))
    }

    /// A reply whose body is `value` as JSON, with content type `application/json`.
    ///
    /// # Errors
    ///
    /// A [`HandlerError::failed`] when `value` cannot be represented in JSON.
    pub fn from_json<T: Serialize + ?Sized>(value: &T) -> std::result::Result<Reply, HandlerError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| HandlerError::failed(format!("cannot encode the reply as JSON: {e}")))?;
        Ok(Reply::new(body).with_content_type(JSON_CONTENT_TYPE))
    }
}

impl Request {
    /// Decodes the body as JSON.
    ///
    /// # Errors
    ///
    /// A [`HandlerError::bad_request`] that says what was wrong, for the caller.
    pub fn json<T: DeserializeOwned>(&self) -> std::result::Result<T, HandlerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HandlerError::bad_request(format!("the request is not the JSON expected: {e}"))
        })
    }
}

impl Client {
    /// Sends `value` as JSON and decodes the reply as JSON.
    ///
    /// # Errors
    ///
    /// Those of [`Client::send`]; [`Error::InvalidRequest`] when `value` cannot be encoded,
    /// and [`Error::InvalidReply`] when the reply is not JSON of the shape `U` expects.
    pub fn call_json<T: Serialize + ?Sized, U: DeserializeOwned>(&self, value: &T) -> Result<U> {
        self.send(&Call::json(value)?)?.json()
    }
}

/// A handler that decodes each request as JSON into a `T`, calls `function` with it and the
/// request (for its headers and properties), and answers with the returned `U` as JSON.
///
/// ```
/// use amqp_rpc::{HandlerError, Request, json};
///
/// #[derive(serde::Deserialize)]
/// struct Greeting { name: String }
///
/// let handler = json::handler(|greeting: Greeting, _request: &Request| {
///     Ok(format!("hello, {}", greeting.name))
/// });
/// # fn is_handler(_: impl amqp_rpc::Handler) {}
/// # is_handler(handler);
/// ```
pub fn handler<T, U, F>(function: F) -> JsonHandler<F, T, U>
where
    T: DeserializeOwned,
    U: Serialize,
    F: Fn(T, &Request) -> std::result::Result<U, HandlerError> + Send + Sync + 'static,
{
    JsonHandler {
        function,
        types: PhantomData,
    }
}

/// The handler made by [`handler`].
pub struct JsonHandler<F, T, U> {
    function: F,
    // `fn(T) -> U` keeps the handler `Send + Sync` whatever `T` and `U` are.
    types: PhantomData<fn(T) -> U>,
}

/// Shows the request and reply types (a closure has nothing to show).
impl<F, T, U> std::fmt::Debug for JsonHandler<F, T, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonHandler")
            .field("request", &std::any::type_name::<T>())
            .field("reply", &std::any::type_name::<U>())
            .finish_non_exhaustive()
    }
}

impl<F, T, U> Handler for JsonHandler<F, T, U>
where
    T: DeserializeOwned + 'static,
    U: Serialize + 'static,
    F: Fn(T, &Request) -> std::result::Result<U, HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, request: &Request) -> std::result::Result<Reply, HandlerError> {
        let input = request.json()?;
        Reply::from_json(&(self.function)(input, request)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Pair {
        a: i64,
        b: i64,
    }

    fn adder() -> impl Handler {
        handler(|pair: Pair, _: &Request| Ok(pair.a + pair.b))
    }

    #[test]
    fn the_handler_decodes_the_request_and_encodes_the_reply() {
        let reply = adder()
            .handle(&Request::new(r#"{"a": 2, "b": 40}"#))
            .unwrap();
        assert_eq!(reply.body(), b"42");
        assert_eq!(reply.content_type(), Some("application/json"));
        assert_eq!(reply.json::<i64>().unwrap(), 42);
    }

    #[test]
    fn a_request_that_does_not_decode_is_a_bad_request_that_says_why() {
        for body in ["not json", r#"{"a": 1}"#, r#"{"a": "x", "b": 1}"#] {
            let error = adder().handle(&Request::new(body)).unwrap_err();
            assert!(error.is_bad_request(), "{body}: {error}");
            assert!(error.message().contains("not the JSON expected"), "{error}");
        }
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_invalid_reply() {
        let error = Reply::new("[1, 2]").json::<Vec<String>>().unwrap_err();
        assert!(error.is_invalid_reply(), "{error:?}");
    }
}
