package agentrun

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/big"
	"reflect"
	"sort"

	pb "github.com/agentrun/agentrun/clients/go/agentrunv1"
)

// ToValue converts a JSON-like Go value to the wire's Value (which keeps integers apart from
// floating-point numbers): nil, bool, integers, floats, string, json.Number, *big.Int, slices,
// and maps with string keys (in key order, as encoding/json writes them). Structs and other
// types go through encoding/json first. Nesting deeper than MaxValueDepth is an error, as the
// server would refuse it.
func ToValue(v any) (*pb.Value, error) { return toValue(v, 0) }

func toValue(v any, depth int) (*pb.Value, error) {
	if depth > MaxValueDepth {
		return nil, fmt.Errorf("value nested deeper than %d levels", MaxValueDepth)
	}
	switch x := v.(type) {
	case nil:
		return &pb.Value{Kind: &pb.Value_NullValue{}}, nil
	case *pb.Value:
		return x, nil
	case bool:
		return &pb.Value{Kind: &pb.Value_BoolValue{BoolValue: x}}, nil
	case string:
		return &pb.Value{Kind: &pb.Value_StringValue{StringValue: x}}, nil
	case int:
		return intValue(int64(x)), nil
	case int8:
		return intValue(int64(x)), nil
	case int16:
		return intValue(int64(x)), nil
	case int32:
		return intValue(int64(x)), nil
	case int64:
		return intValue(x), nil
	case uint8:
		return intValue(int64(x)), nil
	case uint16:
		return intValue(int64(x)), nil
	case uint32:
		return intValue(int64(x)), nil
	case uint:
		return bigValue(new(big.Int).SetUint64(uint64(x))), nil
	case uint64:
		return bigValue(new(big.Int).SetUint64(x)), nil
	case *big.Int:
		return bigValue(x), nil
	case float32:
		return &pb.Value{Kind: &pb.Value_DoubleValue{DoubleValue: float64(x)}}, nil
	case float64:
		return &pb.Value{Kind: &pb.Value_DoubleValue{DoubleValue: x}}, nil
	case json.Number:
		if i, ok := new(big.Int).SetString(string(x), 10); ok {
			return bigValue(i), nil
		}
		f, err := x.Float64()
		if err != nil {
			return nil, err
		}
		return &pb.Value{Kind: &pb.Value_DoubleValue{DoubleValue: f}}, nil
	case []any:
		list := &pb.ListValue{}
		for _, item := range x {
			value, err := toValue(item, depth+1)
			if err != nil {
				return nil, err
			}
			list.Values = append(list.Values, value)
		}
		return &pb.Value{Kind: &pb.Value_ListValue{ListValue: list}}, nil
	case map[string]any:
		keys := make([]string, 0, len(x))
		for key := range x {
			keys = append(keys, key)
		}
		sort.Strings(keys)
		fields := &pb.StructValue{}
		for _, key := range keys {
			value, err := toValue(x[key], depth+1)
			if err != nil {
				return nil, err
			}
			fields.Fields = append(fields.Fields, &pb.StructField{Key: key, Value: value})
		}
		return &pb.Value{Kind: &pb.Value_StructValue{StructValue: fields}}, nil
	}
	// Anything else (structs, typed slices and maps): as encoding/json sees it.
	if rv := reflect.ValueOf(v); rv.Kind() == reflect.Ptr && rv.IsNil() {
		return toValue(nil, depth)
	}
	data, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var generic any
	decoder := json.NewDecoder(bytes.NewReader(data))
	decoder.UseNumber()
	if err := decoder.Decode(&generic); err != nil {
		return nil, err
	}
	return toValue(generic, depth)
}

func intValue(i int64) *pb.Value { return &pb.Value{Kind: &pb.Value_IntValue{IntValue: i}} }

func bigValue(i *big.Int) *pb.Value {
	if i.IsInt64() {
		return intValue(i.Int64())
	}
	return &pb.Value{Kind: &pb.Value_BigIntValue{BigIntValue: i.String()}}
}

// FromValue converts a wire Value to Go: nil, bool, int64, float64, string, *big.Int (beyond
// int64; a malformed one stays its string), []any and map[string]any.
func FromValue(v *pb.Value) any {
	switch x := v.GetKind().(type) {
	case *pb.Value_BoolValue:
		return x.BoolValue
	case *pb.Value_IntValue:
		return x.IntValue
	case *pb.Value_DoubleValue:
		return x.DoubleValue
	case *pb.Value_StringValue:
		return x.StringValue
	case *pb.Value_BigIntValue:
		if i, ok := new(big.Int).SetString(x.BigIntValue, 10); ok {
			return i
		}
		return x.BigIntValue
	case *pb.Value_ListValue:
		out := make([]any, 0, len(x.ListValue.GetValues()))
		for _, item := range x.ListValue.GetValues() {
			out = append(out, FromValue(item))
		}
		return out
	case *pb.Value_StructValue:
		out := make(map[string]any, len(x.StructValue.GetFields()))
		for _, field := range x.StructValue.GetFields() {
			out[field.GetKey()] = FromValue(field.GetValue())
		}
		return out
	}
	return nil
}
