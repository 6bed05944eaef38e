//! WebSocket control frames: ping is answered with a pong carrying the same
//! payload; a client close is echoed with the same code and the gateway then
//! closes the TCP connection.

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error, Message};

use crate::common::*;

fn expect_pong(ws: &mut WsClient, payload: &[u8]) {
    loop {
        match ws.next_message() {
            Message::Pong(p) => {
                assert_eq!(p, payload, "pong must carry the ping's payload");
                return;
            }
            // A heartbeat ping from the gateway; tungstenite answers it.
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn ping_gets_pong_with_same_payload() {
    let gw = Gateway::start(&[]);
    let mut ws = gw.ws("/ws?channel=ctl");

    ws.ws
        .send(Message::Ping(b"are you there?".to_vec()))
        .unwrap();
    expect_pong(&mut ws, b"are you there?");

    ws.ws.send(Message::Ping(Vec::new())).unwrap();
    expect_pong(&mut ws, b"");

    // The largest control payload RFC 6455 allows.
    let max: Vec<u8> = (0..125u8).collect();
    ws.ws.send(Message::Ping(max.clone())).unwrap();
    expect_pong(&mut ws, &max);
}

#[test]
fn client_close_is_echoed_with_1000() {
    let gw = Gateway::start(&[]);
    let mut ws = gw.ws("/ws?channel=ctl");

    ws.ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .unwrap();
    loop {
        match ws.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(
                    frame.code,
                    CloseCode::Normal,
                    "echoed close code: {frame:?}"
                );
                break;
            }
            Ok(Message::Close(None)) => {
                panic!("gateway echoed a close frame without the code 1000")
            }
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(other) => panic!("expected the close echo, got {other:?}"),
            Err(e) => panic!("expected the close echo, got error {e:?}"),
        }
    }
    // After the closing handshake the server closes the TCP connection.
    match ws.ws.read() {
        Err(Error::ConnectionClosed) | Err(Error::AlreadyClosed) => {}
        other => panic!("expected the gateway to close the TCP connection, got {other:?}"),
    }

    // And goes on serving.
    let mut again = gw.ws("/ws?channel=ctl");
    again.ws.send(Message::Ping(b"x".to_vec())).unwrap();
    expect_pong(&mut again, b"x");
}
