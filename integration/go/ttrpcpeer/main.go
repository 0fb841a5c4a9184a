// ttrpcpeer is the Go reference TTRPC peer for spinbox's interop tests. It is built against
// Debian's github.com/containerd/ttrpc (1.1, unary only) and gogo's well-known types, so it needs
// no code generation:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o ttrpcpeer ./integration/go/ttrpcpeer
//
// server mode serves service spinbox.test.v1.Peer on a unix socket and prints "READY" on stdout
// once listening, then one JSON line per finished Sleep call:
//
//	Echo(StringValue) -> StringValue           the same value
//	Inspect(Empty) -> StringValue              JSON {"metadata": {...}, "has_deadline": bool,
//	                                           "timeout_ms": remaining milliseconds}
//	Fail(StringValue "CODE:message") -> error  a status error with that gRPC code and message
//	Sleep(Int64Value ms) -> Empty              sleeps, or returns the context error when the
//	                                           request's deadline (timeout_nano) expires first
//
// client mode reads one JSON call per stdin line, performs it over a single connection, and prints
// one JSON result per line:
//
//	{"service": "...", "method": "...", "kind": "string"|"int64"|"empty", "value": ...,
//	 "metadata": {"k": ["v", ...]}, "timeout_ms": N}
//	-> {"ok": true, "value": "..."} | {"ok": false, "code": N, "message": "...", "source": "status"|"context"}
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const service = "spinbox.test.v1.Peer"

var stdoutMu sync.Mutex

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	stdoutMu.Lock()
	defer stdoutMu.Unlock()
	fmt.Println(string(b))
}

func serve(socket string) error {
	srv, err := ttrpc.NewServer(ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	if err != nil {
		return err
	}
	srv.Register(service, map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.StringValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &types.StringValue{Value: req.Value}, nil
		},
		"Inspect": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			out := map[string]interface{}{"metadata": map[string][]string{}, "has_deadline": false}
			if md, ok := ttrpc.GetMetadata(ctx); ok {
				out["metadata"] = md
			}
			if dl, ok := ctx.Deadline(); ok {
				out["has_deadline"] = true
				out["timeout_ms"] = time.Until(dl).Milliseconds()
			}
			b, _ := json.Marshal(out)
			return &types.StringValue{Value: string(b)}, nil
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.StringValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			parts := strings.SplitN(req.Value, ":", 2)
			code, err := strconv.Atoi(parts[0])
			if err != nil || len(parts) != 2 {
				return nil, status.Errorf(codes.InvalidArgument, "Fail wants CODE:message, got %q", req.Value)
			}
			return nil, status.Error(codes.Code(code), parts[1])
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.Int64Value
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			_, hasDeadline := ctx.Deadline()
			select {
			case <-time.After(time.Duration(req.Value) * time.Millisecond):
				emit(map[string]interface{}{"event": "sleep_done", "has_deadline": hasDeadline})
				return &types.Empty{}, nil
			case <-ctx.Done():
				emit(map[string]interface{}{"event": "sleep_cancelled", "error": ctx.Err().Error(),
					"has_deadline": hasDeadline})
				return nil, ctx.Err()
			}
		},
	})
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Close()
	}()
	emit("READY")
	if err := srv.Serve(context.Background(), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
		return err
	}
	return nil
}

type call struct {
	Service   string              `json:"service"`
	Method    string              `json:"method"`
	Kind      string              `json:"kind"`
	Value     json.RawMessage     `json:"value"`
	Metadata  map[string][]string `json:"metadata"`
	TimeoutMs int64               `json:"timeout_ms"`
}

func request(c call) (proto.Message, proto.Message, error) {
	switch c.Kind {
	case "string", "":
		var s string
		if len(c.Value) > 0 {
			if err := json.Unmarshal(c.Value, &s); err != nil {
				return nil, nil, err
			}
		}
		return &types.StringValue{Value: s}, &types.StringValue{}, nil
	case "int64":
		var n int64
		if err := json.Unmarshal(c.Value, &n); err != nil {
			return nil, nil, err
		}
		return &types.Int64Value{Value: n}, &types.Empty{}, nil
	case "empty":
		return &types.Empty{}, &types.StringValue{}, nil
	}
	return nil, nil, fmt.Errorf("unknown kind %q", c.Kind)
}

func runClient(socket string) error {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return err
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var c call
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			return fmt.Errorf("bad call line %q: %w", in.Text(), err)
		}
		if c.Service == "" {
			c.Service = service
		}
		req, resp, err := request(c)
		if err != nil {
			return err
		}
		ctx := context.Background()
		if len(c.Metadata) > 0 {
			md := ttrpc.MD{}
			for k, vs := range c.Metadata {
				md.Append(k, vs...)
			}
			ctx = ttrpc.WithMetadata(ctx, md)
		}
		cancel := func() {}
		if c.TimeoutMs > 0 {
			ctx, cancel = context.WithTimeout(ctx, time.Duration(c.TimeoutMs)*time.Millisecond)
		}
		err = client.Call(ctx, c.Service, c.Method, req, resp)
		cancel()
		switch {
		case err == nil:
			out := map[string]interface{}{"ok": true}
			if sv, ok := resp.(*types.StringValue); ok {
				out["value"] = sv.Value
			}
			emit(out)
		case errors.Is(err, context.DeadlineExceeded):
			// The client's own deadline fired before the server's answer arrived.
			emit(map[string]interface{}{"ok": false, "code": int(codes.DeadlineExceeded),
				"message": err.Error(), "source": "context"})
		default:
			st, _ := status.FromError(err)
			emit(map[string]interface{}{"ok": false, "code": int(st.Code()), "message": st.Message(),
				"source": "status"})
		}
	}
	return in.Err()
}

func main() {
	socket := flag.String("socket", "", "unix socket path")
	flag.Parse()
	if *socket == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: ttrpcpeer -socket PATH server|client")
		os.Exit(2)
	}
	var err error
	switch flag.Arg(0) {
	case "server":
		err = serve(*socket)
	case "client":
		err = runClient(*socket)
	default:
		err = fmt.Errorf("unknown mode %q", flag.Arg(0))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ttrpcpeer:", err)
		os.Exit(1)
	}
}
