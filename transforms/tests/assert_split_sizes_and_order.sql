-- Split rules of int_split for the active var split (documented in int_split.yml):
--  * temporal: ceil(test_frac * n) test and ceil(valid_frac * n) valid events overall
--    (the time order itself: assert_temporal_split_is_time_ordered);
--  * leave_last_out: a user with >= 3 events has exactly 1 test and 1 valid event, the test
--    event is its latest by (ts, event_id) and the valid one the one before; users with
--    fewer events are all train;
--  * stratified: a user with n >= 3 events has min(ceil(test_frac * n), n - 1) test and
--    min(ceil(valid_frac * n), n - 1 - n_test) valid events; others are all train.
-- Returns the offending groups (none = pass).
{%- set split = var('split') %}
{%- set valid_frac = var('valid_frac') | float %}
{%- set test_frac = var('test_frac') | float %}

with

events as (

    select event_id, user_id, ts, split from {{ ref('int_split') }}

),

{% if split == 'temporal' %}
groups as (

    select
        {{ dbt.cast('null', dbt.type_bigint()) }} as user_id,
        count(*) as n_events,
        sum(case when split = 'test' then 1 else 0 end) as n_test,
        sum(case when split = 'valid' then 1 else 0 end) as n_valid,
        0 as n_out_of_order
    from events

),

expected_test as (

    select *, ceil({{ test_frac }} * n_events) as expected_test
    from groups

),

expected as (

    select *, ceil({{ valid_frac }} * n_events) as expected_valid
    from expected_test

),

{% else %}
ordered as (

    select
        *,
        row_number() over (partition by user_id order by ts desc, event_id desc) as recency
    from events

),

groups as (

    select
        user_id,
        count(*) as n_events,
        sum(case when split = 'test' then 1 else 0 end) as n_test,
        sum(case when split = 'valid' then 1 else 0 end) as n_valid,
        {% if split == 'leave_last_out' %}
        sum(case
            when split = 'test' and recency <> 1 then 1
            when split = 'valid' and recency <> 2 then 1
            else 0
        end) as n_out_of_order
        {% else %}
        0 as n_out_of_order
        {% endif %}
    from ordered
    group by user_id

),

expected_test as (

    select
        *,
        case
            when n_events < 3 then 0
            {% if split == 'leave_last_out' %}
            else 1
            {% else %}
            else least(ceil({{ test_frac }} * n_events), n_events - 1)
            {% endif %}
        end as expected_test
    from groups

),

expected as (

    select
        *,
        case
            when n_events < 3 then 0
            {% if split == 'leave_last_out' %}
            else 1
            {% else %}
            else least(ceil({{ valid_frac }} * n_events), n_events - 1 - expected_test)
            {% endif %}
        end as expected_valid
    from expected_test

),

{% endif %}
failures as (

    select *
    from expected
    where n_test <> expected_test
       or n_valid <> expected_valid
       or n_out_of_order > 0

)

select * from failures
