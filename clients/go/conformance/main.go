// Command conformance is the Go driver of agentrun's conformance scenario
// (tests/conformance/scenario.json; its "comment" says the rules): the generated Go client at
// the level of the proto3 JSON mapping, as every language's driver works. scripts/conformance.py
// (make conformance) starts a server, makes the keys and runs it:
//
//	conformance -server HOST:PORT -keys KEYS.json -scenario scenario.json
//
// It prints a line per step, then "passed N/M"; it exits 1 if a step failed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

const receiveTimeout = 10 * time.Second

var variable = regexp.MustCompile(`\$\{([^}]+)\}`)

type failed struct{ message string }

func (f failed) Error() string { return f.message }

func fail(format string, args ...any) error { return failed{fmt.Sprintf(format, args...)} }

func lookup(saved map[string]any, path string) any {
	var value any = saved
	for _, part := range strings.Split(path, ".") {
		switch v := value.(type) {
		case []any:
			i, err := strconv.Atoi(part)
			if err != nil || i >= len(v) {
				return ""
			}
			value = v[i]
		case map[string]any:
			found, ok := v[part]
			if !ok {
				return "" // absent in the proto3 JSON mapping: the default
			}
			value = found
		default:
			return ""
		}
	}
	return value
}

func substitute(value any, saved map[string]any) any {
	switch v := value.(type) {
	case string:
		if whole := variable.FindStringSubmatch(v); whole != nil && whole[0] == v {
			return lookup(saved, whole[1])
		}
		return variable.ReplaceAllStringFunc(v, func(m string) string {
			return fmt.Sprint(lookup(saved, variable.FindStringSubmatch(m)[1]))
		})
	case []any:
		out := make([]any, len(v))
		for i, item := range v {
			out[i] = substitute(item, saved)
		}
		return out
	case map[string]any:
		out := map[string]any{}
		for key, item := range v {
			out[key] = substitute(item, saved)
		}
		return out
	}
	return value
}

func empty(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case string:
		return x == ""
	case []any:
		return len(x) == 0
	case map[string]any:
		return len(x) == 0
	}
	return false
}

func text(v any) string {
	if f, ok := v.(float64); ok {
		return strconv.FormatFloat(f, 'f', -1, 64)
	}
	return fmt.Sprint(v)
}

// match fails where actual (proto3 JSON) is not a superset of expected.
func match(expected, actual any, where string) error {
	if expected == "*" {
		if empty(actual) {
			return fail("%s: expected a value, got none", where)
		}
		return nil
	}
	switch e := expected.(type) {
	case map[string]any:
		a, _ := actual.(map[string]any)
		if actual != nil && a == nil {
			return fail("%s: expected an object, got %v", where, actual)
		}
		for key, value := range e {
			at := key
			if where != "" {
				at = where + "." + key
			}
			if err := match(value, a[key], at); err != nil {
				return err
			}
		}
		return nil
	case []any:
		a, _ := actual.([]any)
		if len(a) != len(e) {
			return fail("%s: expected %d items, got %v", where, len(e), actual)
		}
		for i := range e {
			if err := match(e[i], a[i], fmt.Sprintf("%s[%d]", where, i)); err != nil {
				return err
			}
		}
		return nil
	}
	if actual == nil && (expected == float64(0) || expected == false || expected == "") {
		return nil
	}
	if eb, ok := expected.(bool); ok {
		if ab, ok := actual.(bool); !ok || ab != eb {
			return fail("%s: expected %v, got %v", where, expected, actual)
		}
		return nil
	}
	if text(expected) != text(actual) {
		return fail("%s: expected %v, got %v", where, expected, actual)
	}
	return nil
}

func toJSON(m proto.Message) map[string]any {
	data, err := protojson.Marshal(m)
	if err != nil {
		panic(err)
	}
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		panic(err)
	}
	return out
}

func fromJSON(value any, m proto.Message) error {
	data, err := json.Marshal(value)
	if err != nil {
		return err
	}
	return protojson.Unmarshal(data, m)
}

type message struct {
	json map[string]any
	end  *status.Status
}

type stream struct {
	call      pb.OrchestratorService_WorkClient
	responses chan message
	buffered  []map[string]any
}

func open(ctx context.Context, client pb.OrchestratorServiceClient) (*stream, error) {
	call, err := client.Work(ctx)
	if err != nil {
		return nil, err
	}
	s := &stream{call: call, responses: make(chan message, 1024)}
	go func() {
		for {
			response, err := call.Recv()
			if err == io.EOF {
				s.responses <- message{end: status.New(0, "")}
				return
			}
			if err != nil {
				s.responses <- message{end: status.Convert(err)}
				return
			}
			s.responses <- message{json: toJSON(response)}
		}
	}()
	return s, nil
}

func (s *stream) next(timeout time.Duration) (message, bool) {
	select {
	case m := <-s.responses:
		return m, true
	case <-time.After(timeout):
		return message{}, false
	}
}

func (s *stream) receive(kind string) (map[string]any, error) {
	for i, m := range s.buffered {
		if _, ok := m[kind]; ok {
			s.buffered = append(s.buffered[:i], s.buffered[i+1:]...)
			return m, nil
		}
	}
	for {
		m, ok := s.next(receiveTimeout)
		if !ok {
			return nil, fail("no %s within %s", kind, receiveTimeout)
		}
		if m.end != nil {
			return nil, fail("the stream ended %s: %s", codeName(m.end), m.end.Message())
		}
		if _, ok := m.json[kind]; ok {
			return m.json, nil
		}
		s.buffered = append(s.buffered, m.json)
	}
}

var codeNames = []string{"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
	"NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
	"UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}

// codeName is a status code's canonical name (google.rpc.Code), as the scenario spells it.
func codeName(s *status.Status) string {
	if int(s.Code()) < len(codeNames) {
		return codeNames[s.Code()]
	}
	return s.Code().String()
}

type driver struct {
	conn    *grpc.ClientConn
	keys    map[string]string
	streams map[string]*stream
	saved   map[string]any
}

func (d *driver) run(step map[string]any) error {
	ctx := context.Background()
	if as, ok := step["as"].(string); ok {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+d.keys[as])
	}
	expect, _ := substitute(step["expect"], d.saved).(map[string]any)
	if call, ok := step["call"].(string); ok {
		return d.call(ctx, step, call, expect)
	}
	name := step["stream"].(string)
	if subscribe, ok := step["open"]; ok {
		s, err := open(ctx, pb.NewOrchestratorServiceClient(d.conn))
		if err != nil {
			return err
		}
		d.streams[name] = s
		request := &pb.WorkRequest{}
		if err := fromJSON(map[string]any{"subscribe": substitute(subscribe, d.saved)}, request); err != nil {
			return err
		}
		_ = s.call.Send(request)
		first, ok := s.next(receiveTimeout)
		if !ok {
			return fail("no answer to subscribe within %s", receiveTimeout)
		}
		code := "OK"
		if first.end != nil {
			code = codeName(first.end)
		}
		if err := match(orDefault(expect["code"], "OK"), code, "code"); err != nil || first.end != nil {
			return err
		}
		delete(expect, "code")
		return match(expect, first.json, "")
	}
	s := d.streams[name]
	if send, ok := step["send"]; ok {
		request := &pb.WorkRequest{}
		if err := fromJSON(substitute(send, d.saved), request); err != nil {
			return err
		}
		if err := s.call.Send(request); err != nil {
			return err
		}
	}
	if kind, ok := step["receive"].(string); ok {
		expected := substitute(step["expect"], d.saved)
		if kind == "leases" {
			count := int(step["count"].(float64))
			var leases []any
			for len(leases) < count {
				m, err := s.receive("leases")
				if err != nil {
					return err
				}
				leases = append(leases, m["leases"].(map[string]any)["leases"].([]any)...)
			}
			if len(leases) > count {
				return fail("expected %d leases, got %d", count, len(leases))
			}
			if expected != nil {
				if err := match(expected, leases, "leases"); err != nil {
					return err
				}
			}
			names, _ := step["save"].([]any)
			for i, saveAs := range names {
				if i < len(leases) {
					d.saved[saveAs.(string)] = leases[i]
				}
			}
			return nil
		}
		m, err := s.receive(kind)
		if err != nil {
			return err
		}
		if expected != nil {
			if err := match(expected, m[kind], kind); err != nil {
				return err
			}
		}
		saves, _ := step["save"].(map[string]any)
		for saveAs, where := range saves {
			d.saved[saveAs] = lookup(m[kind].(map[string]any), where.(string))
		}
		return nil
	}
	if quiet, ok := step["quiet"].(float64); ok {
		if m, ok := s.next(time.Duration(quiet * float64(time.Second))); ok {
			return fail("expected nothing for %v s, got %v", quiet, m.json)
		}
		return nil
	}
	if step["close"] == true {
		_ = s.call.CloseSend()
		for {
			m, ok := s.next(receiveTimeout)
			if !ok {
				return fail("the stream did not end after the half-close")
			}
			if m.end != nil {
				return match(orDefault(expect["code"], "OK"), codeName(m.end), "code")
			}
		}
	}
	return nil
}

func orDefault(v any, fallback string) any {
	if v == nil {
		return fallback
	}
	return v
}

func (d *driver) call(ctx context.Context, step map[string]any, call string, expect map[string]any) error {
	parts := strings.Split(call, "/")
	service, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName("agentrun.v1." + parts[0]))
	if err != nil {
		return err
	}
	method := service.(protoreflect.ServiceDescriptor).Methods().ByName(protoreflect.Name(parts[1]))
	newMessage := func(descriptor protoreflect.MessageDescriptor) proto.Message {
		kind, err := protoregistry.GlobalTypes.FindMessageByName(descriptor.FullName())
		if err != nil {
			panic(err)
		}
		return kind.New().Interface()
	}
	response := newMessage(method.Output())
	path := "/agentrun.v1." + call
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if requests, ok := step["requests"].([]any); ok {
		desc := &grpc.StreamDesc{StreamName: parts[1], ClientStreams: true}
		s, err := d.conn.NewStream(ctx, desc, path)
		if err == nil {
			for _, r := range requests {
				request := newMessage(method.Input())
				if err := fromJSON(substitute(r, d.saved), request); err != nil {
					return err
				}
				if s.SendMsg(request) != nil {
					break
				}
			}
			if err = s.CloseSend(); err == nil {
				err = s.RecvMsg(response)
			}
		}
		return d.answer(step, expect, response, err)
	}
	request := newMessage(method.Input())
	if err := fromJSON(substitute(step["request"], d.saved), request); err != nil {
		return err
	}
	return d.answer(step, expect, response, d.conn.Invoke(ctx, path, request, response))
}

func (d *driver) answer(step, expect map[string]any, response proto.Message, err error) error {
	code, answer := "OK", map[string]any{}
	if err != nil {
		code = codeName(status.Convert(err))
	} else {
		answer = toJSON(response)
	}
	if err := match(orDefault(expect["code"], "OK"), code, "code"); err != nil {
		return err
	}
	if want, ok := expect["response"]; ok {
		if err := match(want, answer, "response"); err != nil {
			return err
		}
	}
	saves, _ := step["save"].(map[string]any)
	for saveAs, where := range saves {
		d.saved[saveAs] = lookup(answer, where.(string))
	}
	return nil
}

func main() {
	server := flag.String("server", "", "host:port")
	keysFile := flag.String("keys", "", "JSON: key name -> token")
	scenarioFile := flag.String("scenario", "tests/conformance/scenario.json", "the scenario")
	flag.Parse()
	var scenario struct {
		Steps []map[string]any `json:"steps"`
	}
	var keys map[string]string
	for file, into := range map[string]any{*scenarioFile: &scenario, *keysFile: &keys} {
		data, err := os.ReadFile(file)
		if err == nil {
			err = json.Unmarshal(data, into)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "conformance:", err)
			os.Exit(2)
		}
	}
	conn, err := grpc.Dial(*server, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "conformance:", err)
		os.Exit(2)
	}
	defer conn.Close()
	d := &driver{conn: conn, keys: keys, streams: map[string]*stream{}, saved: map[string]any{}}
	passed := 0
	for _, step := range scenario.Steps {
		if err := d.run(step); err != nil {
			fmt.Printf("FAIL %s: %v\n", step["name"], err)
		} else {
			passed++
			fmt.Printf("ok   %s\n", step["name"])
		}
	}
	for _, s := range d.streams {
		_ = s.call.CloseSend()
	}
	fmt.Printf("passed %d/%d\n", passed, len(scenario.Steps))
	if passed != len(scenario.Steps) {
		os.Exit(1)
	}
}
