//! RFC 6455, sans-IO: nothing here touches a socket.
